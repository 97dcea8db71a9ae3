// panva/node-oidc-provider (npm `oidc-provider`, OpenID Certified), in memory, on
// 127.0.0.1 at an ephemeral port, in one of two set-ups:
//
// - `reference`: the same clients, user and endpoint paths the interop suite makes on
//   auth-svc, with server-rendered login and consent forms of our own (username, password,
//   a hidden CSRF field; approve/deny), so the three relying-party scripts can be checked
//   against a certified provider: a failure against auth-svc is then auth-svc's.
//   Access tokens are opaque (oidc-provider cannot introspect its own JWT access tokens).
// - `bench`: one client_secret_basic client for the client-credentials grant, ES256 JWT
//   access tokens (resource indicators, `accessTokenFormat: 'jwt'`), as scripts/bench-auth.sh
//   measures it.
//
// Prints one JSON line (the fixture: issuer, clients, user) on stdout when listening, and
// runs until SIGTERM, or until stdin closes unless OIDC_OP_KEEP=1. OIDC_NODE_DIR: where
// oidc-provider is installed.
import http from 'node:http';
import { createRequire } from 'node:module';
import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import { join } from 'node:path';

const require = createRequire(join(process.env.OIDC_NODE_DIR, 'package.json'));
const { default: Provider, errors } = await import(require.resolve('oidc-provider'));
const mode = process.argv[2] ?? 'reference';
const port = Number(process.env.PORT ?? 0);

const server = http.createServer();
await new Promise((ok) => server.listen(port, '127.0.0.1', ok));
const issuer = `http://127.0.0.1:${server.address().port}`;

const REDIRECT = 'http://127.0.0.1:9/cb';
const secret = randomBytes(32).toString('base64url');
const es256 = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
const user = {
  username: 'interop-ada', password: `Pw-${randomBytes(12).toString('hex')}`,
  sub: randomUUID(), email: 'interop-ada@example.com',
};

const common = {
  jwks: { keys: [{ ...es256, kid: 'es256-1', alg: 'ES256', use: 'sig' }] },
  enabledJWA: { idTokenSigningAlgValues: ['ES256'] },
  features: { devInteractions: { enabled: false }, clientCredentials: { enabled: true } },
  routes: { authorization: '/authorize', userinfo: '/userinfo', revocation: '/revoke', introspection: '/introspect' },
};

let config;
let fixture;
if (mode === 'bench') {
  config = {
    ...common,
    clients: [{
      client_id: 'bench', client_secret: secret, grant_types: ['client_credentials'],
      redirect_uris: [], response_types: [], token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: 'ES256',
    }],
    features: {
      ...common.features,
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:sec:bench',
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'api', audience: 'urn:sec:bench', accessTokenTTL: 600,
          accessTokenFormat: 'jwt', jwt: { sign: { alg: 'ES256' } },
        }),
      },
    },
  };
  fixture = { issuer, client_id: 'bench', client_secret: secret };
} else {
  config = {
    ...common,
    clients: [
      {
        client_id: 'interop-confidential', client_secret: secret, redirect_uris: [REDIRECT],
        grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
        response_types: ['code'], token_endpoint_auth_method: 'client_secret_basic',
        id_token_signed_response_alg: 'ES256',
      },
      {
        client_id: 'interop-public', redirect_uris: [REDIRECT], grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'], token_endpoint_auth_method: 'none', id_token_signed_response_alg: 'ES256',
      },
    ],
    features: { ...common.features, introspection: { enabled: true }, revocation: { enabled: true } },
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
    pkce: { required: () => true },
    rotateRefreshToken: true,
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    interactions: { url: (_ctx, i) => `/interaction/${i.uid}` },
    findAccount: async (_ctx, id) => (id !== user.sub ? undefined : {
      accountId: id,
      claims: async () => ({ sub: id, email: user.email, email_verified: true, name: 'Ada Interop' }),
    }),
  };
  fixture = {
    issuer,
    scope: 'openid profile email offline_access',
    confidential: { client_id: 'interop-confidential', client_secret: secret, redirect_uri: REDIRECT },
    public: { client_id: 'interop-public', redirect_uri: REDIRECT },
    user,
  };
}

const provider = new Provider(issuer, config);
const callback = provider.callback();

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const csrf = new Map(); // interaction uid -> CSRF token of its form
function page(res, status, title, body) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'content-security-policy': "default-src 'none'; style-src 'self'; form-action 'self' http://127.0.0.1:*; frame-ancestors 'none'; base-uri 'none'",
    'referrer-policy': 'no-referrer',
    'cache-control': 'no-store',
    'x-content-type-options': 'nosniff',
  });
  res.end(`<!doctype html><html lang="en"><head><title>${esc(title)}</title></head><body><main><h1>${esc(title)}</h1>${body}</main></body></html>`);
}
async function form(req) {
  let raw = '';
  for await (const c of req) { raw += c; if (raw.length > 16384) throw new Error('body too large'); }
  return new URLSearchParams(raw);
}
function loginPage(res, uid, error) {
  const t = randomBytes(16).toString('hex');
  csrf.set(uid, t);
  page(res, error ? 401 : 200, 'Sign in', `${error ? `<p role="alert">${esc(error)}</p>` : ''}
    <form method="post" action="/interaction/${esc(uid)}/login">
      <input type="hidden" name="csrf" value="${t}">
      <label for="username">Username</label> <input id="username" name="username" autocomplete="username" required>
      <label for="password">Password</label> <input id="password" type="password" name="password" autocomplete="current-password" required>
      <button type="submit">Sign in</button>
    </form>`);
}

async function interaction(req, res) {
  const [, , uid, action] = new URL(req.url, issuer).pathname.split('/');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new errors.SessionNotFound('interaction mismatch');
  if (req.method === 'GET') {
    if (details.prompt.name === 'login') return loginPage(res, uid);
    const t = randomBytes(16).toString('hex');
    csrf.set(uid, t);
    const scopes = String(details.params.scope).split(' ').map((s) => `<li>${esc(s)}</li>`).join('');
    return page(res, 200, 'Allow access?', `<p>${esc(details.params.client_id)} asks to:</p><ul>${scopes}</ul>
      <form method="post" action="/interaction/${esc(uid)}/confirm"><input type="hidden" name="csrf" value="${t}">
        <button name="decision" value="deny">Deny</button> <button name="decision" value="approve">Allow</button></form>`);
  }
  const body = await form(req);
  if (body.get('csrf') !== csrf.get(uid)) return page(res, 400, 'Error', '<p role="alert">Invalid form</p>');
  csrf.delete(uid);
  if (action === 'login') {
    if (body.get('username') !== user.username || body.get('password') !== user.password) {
      return loginPage(res, uid, 'Invalid username or password.');
    }
    return provider.interactionFinished(req, res, { login: { accountId: user.sub } }, { mergeWithLastSubmission: false });
  }
  if (body.get('decision') !== 'approve') {
    return provider.interactionFinished(req, res, { error: 'access_denied' }, { mergeWithLastSubmission: false });
  }
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
  const d = details.prompt.details;
  if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
  if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
  for (const [ind, s] of Object.entries(d.missingResourceScopes ?? {})) grant.addResourceScope(ind, s.join(' '));
  const grantId = await grant.save();
  return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

server.on('request', (req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((e) => { if (!res.headersSent) page(res, 400, 'Error', `<p role="alert">${esc(e.message)}</p>`); });
  } else callback(req, res);
});
console.log(JSON.stringify(fixture));
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (process.env.OIDC_OP_KEEP !== '1') {
  process.stdin.on('end', stop);
  process.stdin.resume();
}
