// Verifies token-svc tokens against its published JWKS with npm `jose` (an independent
// implementation). Input on stdin as for verify_pyjwt.py; JOSE_DIR is where jose is
// installed. Exits 1 on any failure.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

const require = createRequire(process.env.JOSE_DIR + '/');
const jose = require('jose');
const data = JSON.parse(readFileSync(0, 'utf8'));
const jwks = jose.createLocalJWKSet(JSON.parse(data.jwks));
let failed = 0;
for (const c of data.cases) {
  try {
    const { payload, protectedHeader } = await jose.jwtVerify(c.token, jwks, {
      issuer: data.iss,
      audience: data.aud,
      algorithms: [c.alg],
      typ: 'at+jwt',
    });
    if (payload.sub !== 'alice' || protectedHeader.alg !== c.alg) throw new Error('claims');
    console.log(`${c.alg} ok`);
  } catch (e) {
    failed++;
    console.log(`${c.alg} FAILED: ${e}`);
  }
  const [h, p, s] = c.token.split('.');
  const bad = `${h}.${p.slice(0, -2)}${p.at(-2) === 'A' ? 'B' : 'A'}${p.at(-1)}.${s}`;
  try {
    await jose.jwtVerify(bad, jwks, { issuer: data.iss, audience: data.aud, algorithms: [c.alg] });
    failed++;
    console.log(`${c.alg} FAILED: a tampered token verified`);
  } catch {}
}
process.exit(failed ? 1 : 0);
