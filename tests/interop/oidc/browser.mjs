// Headless Chromium through puppeteer-core: the login and consent pages as a person uses
// them. Prints "ok <step>" per step; any failure exits non-zero with the reason.
//
// Input (stdin, JSON): as client_node.mjs. Env: OIDC_NODE_DIR (puppeteer-core installed
// there), CHROMIUM (default /usr/bin/chromium), SCREENSHOTS (optional: a directory for
// PNGs of the pages).
import { createRequire } from 'node:module';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { expect, step } from './browserless.mjs';

const require = createRequire(join(process.env.OIDC_NODE_DIR, 'package.json'));
const puppeteer = (await import(require.resolve('puppeteer-core'))).default;
const { issuer, scope, confidential: conf, user } = JSON.parse(readFileSync(0, 'utf8'));
const shots = process.env.SCREENSHOTS;
const b64u = (b) => b.toString('base64url');

function authorizationUrl() {
  const verifier = b64u(randomBytes(32));
  const state = b64u(randomBytes(16));
  const u = new URL('/authorize', issuer);
  u.search = new URLSearchParams({
    response_type: 'code', client_id: conf.client_id, redirect_uri: conf.redirect_uri, scope,
    state, nonce: b64u(randomBytes(16)),
    code_challenge: b64u(createHash('sha256').update(verifier).digest()), code_challenge_method: 'S256',
  }).toString();
  return { url: u.href, state, verifier };
}

// The headers every page of the flow carries (issue 17 §6).
function checkSecurityHeaders(res, what) {
  const h = res.headers();
  const csp = h['content-security-policy'] ?? '';
  expect(csp.includes('frame-ancestors'), `${what}: CSP with frame-ancestors, got "${csp}"`);
  expect(!/unsafe-inline|unsafe-eval/.test(csp.match(/script-src[^;]*/)?.[0] ?? ''), `${what}: no unsafe script-src`);
  expect(h['referrer-policy'], `${what}: Referrer-Policy`);
  expect((h['cache-control'] ?? '').includes('no-store'), `${what}: Cache-Control no-store`);
}

// The input a <label> names (by `for` or by nesting), as a handle; fails when none does.
async function labelled(page, name, text) {
  const h = await page.evaluateHandle((name, text) => {
    for (const l of document.querySelectorAll('label')) {
      const c = l.control;
      if (c && c.name === name && new RegExp(text, 'i').test(l.textContent)) return c;
    }
    return null;
  }, name, text);
  const el = h.asElement();
  expect(el, `a <label> matching /${text}/i for the "${name}" input`);
  return el;
}

// What the page's console said (a CSP violation such as a `form-action` that refuses the
// redirect back to the client shows up only there).
const consoleLog = [];

async function submitAndWait(page, el) {
  try {
    const [res] = await Promise.all([page.waitForNavigation({ waitUntil: 'load', timeout: 20000 }), el.click()]);
    return res;
  } catch (e) {
    throw new Error(`no navigation after submitting the form at ${page.url()}: ${e.message}; console: ${JSON.stringify(consoleLog)}`);
  }
}

/** One browser context through login (and consent, if shown) to the redirect back. */
async function run(browser, { js, password = user.password, checks = false }) {
  const ctx = await browser.createBrowserContext();
  const page = await ctx.newPage();
  await page.setJavaScriptEnabled(js);
  page.on('console', (m) => consoleLog.push(m.text()));
  let landed = null;
  await page.setRequestInterception(true);
  page.on('request', (req) => {
    if (req.url().startsWith(conf.redirect_uri)) {
      landed = req.url();
      req.respond({ status: 200, contentType: 'text/plain', body: 'client callback' });
    } else req.continue();
  });
  const { url, state, verifier } = authorizationUrl();
  let res = await page.goto(url, { waitUntil: 'load' });
  expect(res.status() === 200, `login page HTTP ${res.status()}`);
  if (checks) { checkSecurityHeaders(res, 'login page'); step('login_page_headers'); }
  if (shots) await page.screenshot({ path: join(shots, `login-js-${js}.png`) });
  const u = await labelled(page, 'username', 'user|name|e-?mail');
  const p = await labelled(page, 'password', 'password');
  expect(await page.evaluate(() => !!document.querySelector('main, [role=main]')), 'a main landmark');
  if (checks) step('login_labels');
  await u.type(user.username);
  await p.type(password);
  const submit = await page.evaluateHandle((p) => p.form.querySelector('button:not([type=button]), input[type=submit]'), p);
  res = await submitAndWait(page, submit.asElement());
  if (password !== user.password) return { page, res, ctx };
  if (!landed) {
    expect(res.status() === 200, `consent page HTTP ${res.status()}`);
    if (checks) checkSecurityHeaders(res, 'consent page');
    if (shots) await page.screenshot({ path: join(shots, `consent-js-${js}.png`) });
    const text = await page.evaluate(() => document.body.innerText);
    expect(/openid|sign you in|profile|email/i.test(text), 'the consent page lists the scopes');
    if (checks) step('consent_page_headers');
    const approve = await page.evaluateHandle(() => [...document.querySelectorAll('button, input[type=submit]')]
      .find((b) => /approve|allow|accept|grant|authori[sz]e|yes|continue/i.test(`${b.value} ${b.textContent}`)
        && !/deny|cancel|reject|decline/i.test(`${b.value} ${b.textContent}`)));
    expect(approve.asElement(), 'an approve button');
    await submitAndWait(page, approve.asElement());
  }
  expect(landed, 'landed on the redirect URI');
  const q = new URL(landed).searchParams;
  expect(!q.get('error'), `authorization error ${q.get('error')}`);
  expect(q.get('code') && q.get('state') === state && q.get('iss') === issuer, `code, state and iss in ${landed}`);
  const cookies = await page.cookies(issuer);
  expect(cookies.some((c) => c.httpOnly && c.sameSite === 'Lax'), `an HttpOnly SameSite=Lax session cookie: ${JSON.stringify(cookies.map((c) => [c.name, c.httpOnly, c.sameSite]))}`);
  // The code is good: the client exchanges it.
  const tok = await fetch(new URL('/token', issuer), {
    method: 'POST',
    headers: {
      authorization: `Basic ${Buffer.from(`${encodeURIComponent(conf.client_id)}:${encodeURIComponent(conf.client_secret)}`).toString('base64')}`,
      'content-type': 'application/x-www-form-urlencoded',
    },
    body: new URLSearchParams({ grant_type: 'authorization_code', code: q.get('code'), redirect_uri: conf.redirect_uri, code_verifier: verifier }),
  });
  const body = await tok.json();
  expect(tok.status === 200 && body.access_token && body.id_token, `token exchange: ${tok.status} ${JSON.stringify(body)}`);
  await ctx.close();
}

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
try {
  await run(browser, { js: true, checks: true });
  step('code_with_javascript');
  await run(browser, { js: false });
  step('code_without_javascript');
  const { page, res, ctx } = await run(browser, { js: false, password: `${user.password}-wrong` });
  expect(res.status() >= 200 && res.status() < 500, `wrong password: HTTP ${res.status()}`);
  expect(await page.$('input[type=password]'), 'the login form is shown again');
  const err = await page.evaluate(() => {
    const el = document.querySelector('[role=alert], .error, #error');
    return el ? el.innerText : '';
  });
  expect(/invalid|incorrect|wrong|failed|not recogni[sz]ed|did not match/i.test(err), `a visible error (role=alert): "${err}"`);
  if (shots) await page.screenshot({ path: join(shots, 'login-error.png') });
  await ctx.close();
  step('wrong_password_visible_error');
} catch (e) {
  console.error(`FAILED: ${e?.stack ?? e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
