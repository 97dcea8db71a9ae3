"""Python `authlib` (OAuth2Session on requests) against auth-svc: the whole relying-party
list, one "ok <step>" line per step; any failure exits non-zero with the reason.

Input (stdin, JSON): as client_node.mjs. The ID token is validated the way authlib's own
OpenID integration does it (`parse_id_token`): signature against /jwks with joserfc
(authlib's JOSE backend), then `authlib.oidc.core.CodeIDToken` (iss, aud, exp, nonce,
at_hash).
"""

import html
import json
import re
import sys
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlparse

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session, OAuthError
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry


def expect(cond, what):
    if not cond:
        raise AssertionError(f"check failed: {what}")


def step(name):
    print(f"ok {name}", flush=True)


class Forms(HTMLParser):
    """Every form of a page: action, method, inputs and submit buttons."""

    def __init__(self):
        super().__init__()
        self.forms, self._button = [], None

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get").lower(),
                               "inputs": [], "buttons": []})
        elif not self.forms:
            return
        elif tag == "input":
            self.forms[-1]["inputs"].append(a)
            if a.get("type", "").lower() == "submit":
                self.forms[-1]["buttons"].append(dict(a, text=a.get("value", "")))
        elif tag == "button":
            self._button = dict(a, text="")
            self.forms[-1]["buttons"].append(self._button)

    def handle_endtag(self, tag):
        if tag == "button":
            self._button = None

    def handle_data(self, data):
        if self._button is not None:
            self._button["text"] += data.strip()


def fields(form, button):
    data = []
    for i in form["inputs"]:
        t = i.get("type", "text").lower()
        if not i.get("name") or t in ("submit", "button", "image"):
            continue
        if t in ("checkbox", "radio") and "checked" not in i:
            continue
        data.append((i["name"], i.get("value", "on" if t == "checkbox" else "")))
    if button and button.get("name"):
        data.append((button["name"], button.get("value", "")))
    return data


APPROVE = re.compile(r"approve|allow|accept|grant|authori[sz]e|consent|yes|continue", re.I)
DENY = re.compile(r"deny|cancel|reject|decline|refuse|\bno\b", re.I)


def score(b):
    s = f"{b.get('name', '')} {b.get('value', '')} {b.get('text', '')}"
    return (2 if APPROVE.search(s) else 0) - (3 if DENY.search(s) else 0)


def navigate(ua, auth_url, redirect_uri, user):
    """GET the authorization URL, fill login (and consent) and return the redirect back."""
    url, method, data = auth_url, "GET", None
    origin = urlparse(auth_url).netloc
    for _ in range(12):
        r = ua.request(method, url, data=data, allow_redirects=False, headers={"Accept": "text/html"})
        if 300 <= r.status_code < 400:
            loc = urljoin(url, r.headers["Location"])
            if loc.startswith(redirect_uri):
                q = parse_qs(urlparse(loc).query)
                expect("error" not in q, f"authorization error: {q}")
                expect("code" in q, "code in the redirect")
                return loc
            expect(urlparse(loc).netloc == origin, f"redirect stays on the server: {loc}")
            url, method, data = loc, "GET", None
            continue
        expect(r.status_code == 200, f"page {url}: HTTP {r.status_code}: {r.text[:300]}")
        p = Forms()
        p.feed(r.text)
        login = next((f for f in p.forms if any(i.get("type", "").lower() == "password" for i in f["inputs"])), None)
        if login:
            form = login
            button = next((b for b in form["buttons"] if not DENY.search(b.get("text", ""))), None)
            expect(any(i.get("name") == "username" for i in form["inputs"]), "login form has a username input")
            expect(any(i.get("type", "").lower() == "hidden" for i in form["inputs"]), "login form has a hidden CSRF field")
            data = [(k, v) for k, v in fields(form, button) if k not in ("username", "password")]
            data += [("username", user["username"]), ("password", user["password"])]
        else:
            cands = [(f, b) for f in p.forms for b in (f["buttons"] or [{}])]
            cands.sort(key=lambda fb: -score(fb[1]))
            expect(cands and score(cands[0][1]) > 0, f"a consent form with an approve button at {url}: {r.text[:400]}")
            form, button = cands[0]
            data = fields(form, button)
        url = urljoin(url, html.unescape(form["action"]) or url)
        method = "POST" if form["method"] == "post" else "GET"
        if method == "GET":
            url = requests.Request("GET", url, params=data).prepare().url
            data = None
    raise AssertionError("too many hops before the redirect back")


def oauth_error(fn):
    try:
        fn()
    except OAuthError as e:
        return e.error
    return None


def main():
    cfg = json.load(sys.stdin)
    issuer, scope, conf, pub, user = cfg["issuer"], cfg["scope"], cfg["confidential"], cfg["public"], cfg["user"]

    md = requests.get(issuer + "/.well-known/openid-configuration", timeout=10).json()
    expect(md["issuer"] == issuer, f"discovery issuer {md['issuer']}")
    expect("S256" in md.get("code_challenge_methods_supported", []), "S256 advertised")
    for k in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint",
              "revocation_endpoint", "introspection_endpoint"):
        expect(md.get(k, "").startswith(issuer), f"{k} under the issuer")
    jwks = KeySet.import_key_set(requests.get(md["jwks_uri"], timeout=10).json())
    step("discovery")

    def session(c, method):
        return OAuth2Session(c["client_id"], c.get("client_secret"), scope=scope, redirect_uri=c["redirect_uri"],
                             code_challenge_method="S256", token_endpoint_auth_method=method)

    def validate_id_token(token, nonce, client_id):
        t = jwt.decode(token["id_token"], jwks,
                       registry=JWSRegistry(algorithms=md.get("id_token_signing_alg_values_supported")))
        claims = CodeIDToken(t.claims, t.header, {"iss": {"essential": True, "value": issuer}},
                             {"nonce": nonce, "client_id": client_id, "access_token": token["access_token"]})
        claims.validate(leeway=5)
        return claims

    ua = requests.Session()  # the browser: its cookie jar holds the login session

    def code_flow(c, method):
        s = session(c, method)
        verifier, nonce = generate_token(48), generate_token(20)
        uri, state = s.create_authorization_url(md["authorization_endpoint"], code_verifier=verifier, nonce=nonce)
        expect("code_challenge_method=S256" in uri, "authlib sent an S256 challenge")
        loc = navigate(ua, uri, c["redirect_uri"], user)
        q = parse_qs(urlparse(loc).query)
        expect(q.get("iss") == [issuer], f"iss in the redirect: {q.get('iss')}")
        token = s.fetch_token(md["token_endpoint"], authorization_response=loc, state=state, code_verifier=verifier)
        return s, token, validate_id_token(token, nonce, c["client_id"])

    s, t1, claims = code_flow(conf, "client_secret_basic")
    step("authorize_login_form")
    expect(t1.get("access_token") and t1.get("refresh_token") and t1.get("id_token"), "access, refresh and ID tokens")
    expect(t1["token_type"].lower() == "bearer", f"token_type {t1['token_type']}")
    step("token_exchange")
    expect(claims["sub"] == user["sub"], f"id_token sub {claims['sub']}")
    step("id_token_validated")

    info = s.get(md["userinfo_endpoint"])
    expect(info.status_code == 200, f"userinfo {info.status_code}")
    expect(info.json()["sub"] == user["sub"] and info.json().get("email") == user["email"], f"userinfo {info.text}")
    step("userinfo")

    def introspect(token, hint=None):
        kw = {"token_type_hint": hint} if hint else {}
        r = s.introspect_token(md["introspection_endpoint"], token=token, **kw)
        expect(r.status_code == 200, f"introspect {r.status_code} {r.text}")
        return r.json()

    ia = introspect(t1["access_token"], "access_token")
    expect(ia.get("active") is True and ia.get("sub") == user["sub"] and ia.get("client_id") == conf["client_id"],
           f"introspect access {ia}")
    expect("openid" in ia.get("scope", "").split(), "introspect access scope")
    step("introspect_access_active")
    ir = introspect(t1["refresh_token"], "refresh_token")
    expect(ir.get("active") is True and ir.get("client_id") == conf["client_id"], f"introspect refresh {ir}")
    step("introspect_refresh_active")

    # authlib resends the session's scope unless told: ask for the scope that was granted.
    granted = t1.get("scope")
    t2 = s.refresh_token(md["token_endpoint"], refresh_token=t1["refresh_token"], scope=granted)
    expect(t2.get("access_token") and t2.get("refresh_token"), "refreshed tokens")
    expect(t2["refresh_token"] != t1["refresh_token"], "rotated refresh token differs")
    step("refresh_rotated")

    err = oauth_error(lambda: s.refresh_token(md["token_endpoint"], refresh_token=t1["refresh_token"], scope=granted))
    expect(err == "invalid_grant", f"old refresh token: {err}")
    step("reuse_old_refused")
    err = oauth_error(lambda: s.refresh_token(md["token_endpoint"], refresh_token=t2["refresh_token"], scope=granted))
    expect(err == "invalid_grant", f"new refresh token after reuse: {err}")
    step("reuse_family_revoked")

    s, t3, _ = code_flow(conf, "client_secret_basic")
    r = s.revoke_token(md["revocation_endpoint"], t3["access_token"], token_type_hint="access_token")
    expect(r.status_code == 200, f"revoke {r.status_code}")
    expect(introspect(t3["access_token"])["active"] is False, "revoked access token inactive")
    r = requests.get(md["userinfo_endpoint"], headers={"Authorization": f"Bearer {t3['access_token']}"}, timeout=10)
    expect(r.status_code == 401 and "invalid_token" in r.headers.get("WWW-Authenticate", ""),
           f"userinfo refuses a revoked access token: {r.status_code} {r.headers.get('WWW-Authenticate')}")
    step("revoke_access")
    # RFC 7009 §2.1 lets revoking an access token revoke its refresh token too: a fresh
    # grant for the refresh token's turn.
    s, t4, _ = code_flow(conf, "client_secret_basic")
    expect(introspect(t4["refresh_token"])["active"] is True, "refresh active")
    r = s.revoke_token(md["revocation_endpoint"], t4["refresh_token"], token_type_hint="refresh_token")
    expect(r.status_code == 200, f"revoke {r.status_code}")
    expect(introspect(t4["refresh_token"])["active"] is False, "revoked refresh token inactive")
    err = oauth_error(lambda: s.refresh_token(md["token_endpoint"], refresh_token=t4["refresh_token"], scope=t4.get("scope")))
    expect(err == "invalid_grant", f"revoked refresh token: {err}")
    step("revoke_refresh")

    cc_session = OAuth2Session(conf["client_id"], conf["client_secret"], token_endpoint_auth_method="client_secret_basic")
    cc = cc_session.fetch_token(md["token_endpoint"], grant_type="client_credentials")
    expect(cc.get("access_token") and not cc.get("refresh_token") and not cc.get("id_token"), f"cc token {cc}")
    ic = introspect(cc["access_token"])
    expect(ic.get("active") is True and ic.get("client_id") == conf["client_id"], f"introspect cc {ic}")
    s.revoke_token(md["revocation_endpoint"], cc["access_token"])
    expect(introspect(cc["access_token"])["active"] is False, "revoked cc inactive")
    step("client_credentials")

    _, tp, pclaims = code_flow(pub, "none")
    expect(pclaims["aud"] == pub["client_id"] or pub["client_id"] in pclaims["aud"], "public id_token aud")
    expect(tp.get("access_token"), "public client got an access token")
    step("public_client_pkce")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - the test prints the reason
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
