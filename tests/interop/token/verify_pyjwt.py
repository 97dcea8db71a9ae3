"""Verifies token-svc tokens against its published JWKS with PyJWT (an independent
implementation). Input on stdin: {"jwks": "...", "iss": "...", "aud": "...",
"cases": [{"alg": "ES256", "token": "..."}]}. Prints one line per case; exits 1 on any
failure."""
import json
import sys

import jwt

data = json.load(sys.stdin)
jwks = jwt.PyJWKSet.from_dict(json.loads(data["jwks"]))
failed = 0
for case in data["cases"]:
    try:
        header = jwt.get_unverified_header(case["token"])
        key = next(k for k in jwks.keys if k.key_id == header["kid"])
        claims = jwt.decode(
            case["token"],
            key.key,
            algorithms=[case["alg"]],
            audience=data["aud"],
            issuer=data["iss"],
        )
        assert header["typ"] == "at+jwt", header
        assert header["alg"] == case["alg"], header
        assert claims["sub"] == "alice", claims
        print(f"{case['alg']} ok")
    except Exception as e:  # noqa: BLE001 - report every failure
        failed += 1
        print(f"{case['alg']} FAILED: {type(e).__name__}: {e}")
    # A tampered token must fail.
    head, payload, sig = case["token"].split(".")
    bad = f"{head}.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{sig}"
    try:
        jwt.decode(bad, key.key, algorithms=[case["alg"]], audience=data["aud"], issuer=data["iss"])
        failed += 1
        print(f"{case['alg']} FAILED: a tampered token verified")
    except jwt.InvalidTokenError:
        pass
sys.exit(1 if failed else 0)
