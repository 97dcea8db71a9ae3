// The user-agent part of the authorization code flow without a browser: GET the
// authorization URL with a cookie jar, fill the login form (its hidden fields kept),
// approve consent if shown, and stop at the redirect to the client's redirect_uri (never
// dereferenced). Shared by the node client; the Python and Rust clients have their own.

export function expect(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

export function step(name) {
  console.log(`ok ${name}`);
}

const ENTITIES = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", '#39': "'" };
function unescape(s) {
  return s.replace(/&(#x[0-9a-f]+|#[0-9]+|[a-z0-9]+);/gi, (m, e) => {
    if (e[0] === '#') {
      const n = e[1] === 'x' || e[1] === 'X' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
      return String.fromCodePoint(n);
    }
    return ENTITIES[e.toLowerCase()] ?? m;
  });
}

function attrs(tag) {
  const out = {};
  for (const m of tag.matchAll(/([a-zA-Z_:][-a-zA-Z0-9_:.]*)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?/g)) {
    out[m[1].toLowerCase()] = unescape(m[2] ?? m[3] ?? m[4] ?? '');
  }
  return out;
}

/** Every form of a page: action, method, inputs and submit buttons. */
export function forms(html) {
  const out = [];
  for (const f of html.matchAll(/<form\b([^>]*)>([\s\S]*?)<\/form>/gi)) {
    const a = attrs(f[1]);
    const inputs = [...f[2].matchAll(/<input\b([^>]*)>/gi)].map((m) => attrs(m[1]));
    const buttons = [...f[2].matchAll(/<button\b([^>]*)>([\s\S]*?)<\/button>/gi)].map((m) => ({
      ...attrs(m[1]),
      text: m[2].replace(/<[^>]*>/g, '').trim(),
    }));
    for (const i of inputs) {
      if ((i.type ?? '').toLowerCase() === 'submit') buttons.push({ ...i, text: i.value ?? '' });
    }
    out.push({ action: a.action ?? '', method: (a.method ?? 'get').toLowerCase(), inputs, buttons });
  }
  return out;
}

/** The fields a browser would submit: named inputs (checked boxes only) and one button. */
function fields(form, button) {
  const body = new URLSearchParams();
  for (const i of form.inputs) {
    const type = (i.type ?? 'text').toLowerCase();
    if (!i.name || type === 'submit' || type === 'button' || type === 'image') continue;
    if ((type === 'checkbox' || type === 'radio') && !('checked' in i)) continue;
    body.append(i.name, i.value ?? (type === 'checkbox' ? 'on' : ''));
  }
  if (button?.name) body.append(button.name, button.value ?? '');
  return body;
}

const APPROVE = /approve|allow|accept|grant|authori[sz]e|consent|yes|continue/i;
const DENY = /deny|cancel|reject|decline|refuse|\bno\b/i;

function score(b) {
  const s = `${b.name ?? ''} ${b.value ?? ''} ${b.text ?? ''}`;
  return (APPROVE.test(s) ? 2 : 0) - (DENY.test(s) ? 3 : 0);
}

function storeCookies(jar, res) {
  for (const c of res.headers.getSetCookie()) {
    const [pair, ...rest] = c.split(';');
    const eq = pair.indexOf('=');
    const name = pair.slice(0, eq).trim();
    const value = pair.slice(eq + 1).trim();
    const expired = rest.some((a) => /^\s*max-age\s*=\s*(0|-)/i.test(a)) ||
      rest.some((a) => /^\s*expires\s*=/i.test(a) && Date.parse(a.split('=')[1]) < Date.now());
    if (expired || value === '') jar.delete(name); else jar.set(name, value);
  }
}

/**
 * Follows the authorization request to the redirect back to `redirectUri` and returns
 * `{ location, pages }` (pages: how many HTML pages were filled in). Throws on an error
 * redirect or an unexpected page.
 */
export async function navigate(authUrl, redirectUri, user, jar, log = () => {}) {
  let url = authUrl;
  let method = 'GET';
  let body;
  let pages = 0;
  for (let hop = 0; hop < 12; hop++) {
    const headers = { accept: 'text/html' };
    if (jar.size) headers.cookie = [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
    if (body) headers['content-type'] = 'application/x-www-form-urlencoded';
    const res = await fetch(url, { method, headers, body, redirect: 'manual' });
    storeCookies(jar, res);
    log(`${method} ${url} -> ${res.status}`);
    if (res.status >= 300 && res.status < 400) {
      const loc = new URL(res.headers.get('location'), url).href;
      if (loc.startsWith(redirectUri)) {
        const q = new URL(loc).searchParams;
        if (q.get('error')) throw new Error(`authorization error: ${q.get('error')} ${q.get('error_description') ?? ''}`);
        expect(q.get('code'), 'code in the redirect');
        return { location: loc, pages };
      }
      expect(new URL(loc).origin === new URL(authUrl).origin, `redirect stays on the server: ${loc}`);
      url = loc; method = 'GET'; body = undefined;
      continue;
    }
    const html = await res.text();
    expect(res.status === 200, `page ${url}: HTTP ${res.status}: ${html.slice(0, 300)}`);
    const fs = forms(html);
    const login = fs.find((f) => f.inputs.some((i) => (i.type ?? '').toLowerCase() === 'password'));
    let form;
    let button;
    let data;
    if (login) {
      form = login;
      button = form.buttons.find((b) => !DENY.test(`${b.name ?? ''} ${b.text ?? ''}`)) ?? form.buttons[0];
      data = fields(form, button);
      expect(form.inputs.some((i) => i.name === 'username'), 'login form has a username input');
      expect(form.inputs.some((i) => (i.type ?? '').toLowerCase() === 'hidden'), 'login form has a hidden CSRF field');
      data.set('username', user.username);
      data.set('password', user.password);
    } else {
      const cands = fs.flatMap((f) => (f.buttons.length ? f.buttons : [{}]).map((b) => ({ f, b })));
      cands.sort((x, y) => score(y.b) - score(x.b));
      expect(cands.length && score(cands[0].b) > 0, `a consent form with an approve button at ${url}: ${html.slice(0, 400)}`);
      ({ f: form, b: button } = cands[0]);
      data = fields(form, button);
    }
    pages++;
    url = new URL(form.action || url, url).href;
    method = form.method === 'post' ? 'POST' : 'GET';
    if (method === 'GET') { const u = new URL(url); u.search = data.toString(); url = u.href; body = undefined; } else body = data.toString();
  }
  throw new Error('too many hops before the redirect back');
}
