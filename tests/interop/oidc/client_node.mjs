// npm `openid-client` (v6) against auth-svc: the whole relying-party list, one "ok <step>"
// line per step; any failure exits non-zero with the reason.
//
// Input (stdin, JSON): { issuer, scope, confidential: { client_id, client_secret,
// redirect_uri }, public: { client_id, redirect_uri }, user: { username, password, sub } }.
// The module directory comes from OIDC_NODE_DIR (the test installs openid-client there).
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { navigate, expect, step } from './browserless.mjs';

const require = createRequire(join(process.env.OIDC_NODE_DIR, 'package.json'));
const client = await import(require.resolve('openid-client'));

const input = JSON.parse(readFileSync(0, 'utf8'));
const { issuer, scope, confidential: conf, public: pub, user } = input;
const insecure = { execute: [client.allowInsecureRequests] };

// Refused by the token endpoint with `invalid_grant` (RFC 6749 §5.2).
async function expectInvalidGrant(promise, what) {
  try {
    await promise;
  } catch (e) {
    expect(e.error === 'invalid_grant', `${what}: expected invalid_grant, got ${e.error ?? e}`);
    return;
  }
  throw new Error(`${what}: was accepted`);
}

// Authorization code + PKCE S256 through the login form; the library builds the URL and
// checks state, iss (RFC 9207) and the ID token (signature from /jwks, iss, aud, nonce).
async function codeFlow(config, redirectUri, jar) {
  const verifier = client.randomPKCECodeVerifier();
  const challenge = await client.calculatePKCECodeChallenge(verifier);
  const state = client.randomState();
  const nonce = client.randomNonce();
  const url = client.buildAuthorizationUrl(config, {
    redirect_uri: redirectUri,
    scope,
    code_challenge: challenge,
    code_challenge_method: 'S256',
    state,
    nonce,
  });
  const { location } = await navigate(url.href, redirectUri, user, jar);
  const back = new URL(location);
  expect(back.searchParams.get('iss') === issuer, `iss in the redirect: ${back.searchParams.get('iss')}`);
  expect(back.searchParams.get('state') === state, 'state echoed');
  const tokens = await client.authorizationCodeGrant(config, back, {
    pkceCodeVerifier: verifier,
    expectedState: state,
    expectedNonce: nonce,
    idTokenExpected: true,
  });
  return tokens;
}

async function main() {
  // Discovery (OIDC Discovery 1.0 / RFC 8414).
  const config = await client.discovery(
    new URL(issuer), conf.client_id, conf.client_secret,
    client.ClientSecretBasic(conf.client_secret), insecure);
  client.enableNonRepudiationChecks(config); // verify ID token signatures against /jwks
  const md = config.serverMetadata();
  expect(md.issuer === issuer, `discovery issuer ${md.issuer}`);
  expect(md.code_challenge_methods_supported?.includes('S256'), 'S256 advertised');
  for (const k of ['authorization_endpoint', 'token_endpoint', 'jwks_uri', 'userinfo_endpoint',
    'revocation_endpoint', 'introspection_endpoint']) {
    expect(typeof md[k] === 'string' && md[k].startsWith(issuer), `${k} under the issuer`);
  }
  step('discovery');

  const jar = new Map();
  const t1 = await codeFlow(config, conf.redirect_uri, jar);
  step('authorize_login_form');
  expect(t1.access_token && t1.refresh_token && t1.id_token, 'access, refresh and ID tokens');
  expect(t1.token_type.toLowerCase() === 'bearer', `token_type ${t1.token_type}`);
  step('token_exchange');
  const claims = t1.claims();
  expect(claims.sub === user.sub, `id_token sub ${claims.sub}`);
  expect(claims.iss === issuer && (claims.aud === conf.client_id || claims.aud.includes(conf.client_id)),
    'id_token iss and aud');
  step('id_token_validated');

  const info = await client.fetchUserInfo(config, t1.access_token, user.sub);
  expect(info.sub === user.sub, 'userinfo sub');
  expect(info.email === user.email, `userinfo email ${info.email}`);
  step('userinfo');

  const ia = await client.tokenIntrospection(config, t1.access_token);
  expect(ia.active === true && ia.sub === user.sub && ia.client_id === conf.client_id,
    `introspect access ${JSON.stringify(ia)}`);
  expect(String(ia.scope).split(' ').includes('openid'), 'introspect access scope');
  step('introspect_access_active');
  const ir = await client.tokenIntrospection(config, t1.refresh_token, { token_type_hint: 'refresh_token' });
  expect(ir.active === true && ir.client_id === conf.client_id, `introspect refresh ${JSON.stringify(ir)}`);
  step('introspect_refresh_active');

  // Refresh with rotation: a new refresh token, the old one now spent.
  const t2 = await client.refreshTokenGrant(config, t1.refresh_token);
  expect(t2.access_token && t2.refresh_token, 'refreshed tokens');
  expect(t2.refresh_token !== t1.refresh_token, 'rotated refresh token differs');
  await client.fetchUserInfo(config, t2.access_token, user.sub);
  step('refresh_rotated');

  // Reuse detection: the old one is refused, and that revokes the family (the new one too).
  await expectInvalidGrant(client.refreshTokenGrant(config, t1.refresh_token), 'old refresh token');
  step('reuse_old_refused');
  await expectInvalidGrant(client.refreshTokenGrant(config, t2.refresh_token), 'new refresh token after reuse');
  step('reuse_family_revoked');

  // Revocation (RFC 7009) of both kinds, seen by introspection (RFC 7662) and the
  // resource (userinfo). A second authorization reuses the browser session.
  const t3 = await codeFlow(config, conf.redirect_uri, jar);
  await client.tokenRevocation(config, t3.access_token, { token_type_hint: 'access_token' });
  expect((await client.tokenIntrospection(config, t3.access_token)).active === false,
    'revoked access token inactive');
  let refused = false;
  try { await client.fetchUserInfo(config, t3.access_token, user.sub); } catch (e) {
    refused = e.status === 401 || e.response?.status === 401 || /401|invalid_token/.test(String(e));
  }
  expect(refused, 'userinfo refuses a revoked access token with 401');
  step('revoke_access');
  // RFC 7009 §2.1 lets revoking an access token revoke its refresh token too: a fresh
  // grant for the refresh token's turn.
  const t4 = await codeFlow(config, conf.redirect_uri, jar);
  expect((await client.tokenIntrospection(config, t4.refresh_token)).active === true, 'refresh active');
  await client.tokenRevocation(config, t4.refresh_token, { token_type_hint: 'refresh_token' });
  expect((await client.tokenIntrospection(config, t4.refresh_token)).active === false,
    'revoked refresh token inactive');
  await expectInvalidGrant(client.refreshTokenGrant(config, t4.refresh_token), 'revoked refresh token');
  step('revoke_refresh');

  // Client credentials.
  const cc = await client.clientCredentialsGrant(config, {});
  expect(cc.access_token && !cc.refresh_token && !cc.id_token, 'client credentials: access token only');
  const ic = await client.tokenIntrospection(config, cc.access_token);
  expect(ic.active === true && ic.client_id === conf.client_id, `introspect cc ${JSON.stringify(ic)}`);
  await client.tokenRevocation(config, cc.access_token);
  expect((await client.tokenIntrospection(config, cc.access_token)).active === false, 'revoked cc inactive');
  step('client_credentials');

  // A public client: PKCE, no secret (token_endpoint_auth_method none).
  const pconfig = await client.discovery(new URL(issuer), pub.client_id, undefined, client.None(), insecure);
  client.enableNonRepudiationChecks(pconfig);
  const tp = await codeFlow(pconfig, pub.redirect_uri, jar);
  expect(tp.claims().aud === pub.client_id || tp.claims().aud.includes(pub.client_id), 'public id_token aud');
  step('public_client_pkce');
}

main().catch((e) => {
  console.error(`FAILED: ${e?.stack ?? e}`);
  if (e?.cause) console.error('cause:', JSON.stringify(e.cause));
  process.exit(1);
});
