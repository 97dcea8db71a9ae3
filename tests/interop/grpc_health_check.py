#!/usr/bin/env python3
"""Third-party gRPC interop check: talks to every secd service with stock `grpcio`.

Usage: grpc_health_check.py --token-file DATA_DIR/admin.token NAME=HOST:PORT ...

For each NAME=HOST:PORT (NAME one of audit crypto token session auth gdpr assess):
  * grpc.health.v1.Health/Check for the service's full name and for "" is SERVING;
    an unknown name and the six sibling services' names are NOT_FOUND;
  * server reflection (v1 and v1alpha) lists the service's own name and no other
    `sec.*` service, and the descriptors it serves resolve the service's methods;
and, on the audit port:
  * sec.audit.v1.AuditService/ListEvents without credentials is UNAUTHENTICATED;
  * with `authorization: Bearer <admin token>` it succeeds, and the response (decoded
    with descriptors fetched over reflection) holds a `started` event from all seven.

Uses only plain `grpc.insecure_channel`, generic calls and the message classes shipped
in grpcio-health-checking / grpcio-reflection. Prints one line per check; exits 1 on
the first failing service with a clear message (after checking the rest), 2 on usage.
"""

import argparse
import sys
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICES = {
    "audit": "sec.audit.v1.AuditService",
    "crypto": "sec.crypto.v1.CryptoService",
    "token": "sec.token.v1.TokenService",
    "session": "sec.session.v1.SessionService",
    "auth": "sec.auth.v1.AuthService",
    "gdpr": "sec.gdpr.v1.GdprService",
    "assess": "sec.assess.v1.AssessService",
}
# Further services a process serves next to its own (auth-svc hosts edge protection).
ALSO_SERVES = {
    "auth": ["sec.edge.v1.EdgeService"],
}
HEALTH = "grpc.health.v1.Health"
UNKNOWN = "sec.interop.v1.NoSuchService"
# grpcio-reflection only ships v1alpha messages; v1 is the same wire format under a
# different method path, so the v1alpha classes serialize v1 requests byte-for-byte.
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
LIST_EVENTS = "/sec.audit.v1.AuditService/ListEvents"
RPC_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10.0
EVENTS_WAIT = 10.0


def message_class(descriptor):
    # protobuf >= 4.22 has GetMessageClass; older releases only the (now removed) factory.
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


class CheckFailed(Exception):
    pass


def ok(name, what):
    print(f"  ok    {name:<8} {what}", flush=True)


def fail(name, what):
    raise CheckFailed(f"{name}: {what}")


def status_name(code):
    return health_pb2.HealthCheckResponse.ServingStatus.Name(code)


def check_health(name, full, channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for svc in (full, ""):
        label = repr(svc)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            fail(name, f"Health/Check({label}) failed: {e.code().name}: {e.details()}")
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            fail(name, f"Health/Check({label}) is {status_name(resp.status)}, want SERVING")
        ok(name, f"Health/Check({label}) = SERVING")
    not_found = [UNKNOWN] + [s for s in SERVICES.values() if s != full]
    for svc in not_found:
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                fail(name, f"Health/Check({svc!r}) = {e.code().name} ({e.details()}), want NOT_FOUND")
            continue
        fail(name, f"Health/Check({svc!r}) = {status_name(resp.status)}, want NOT_FOUND")
    ok(name, f"Health/Check({UNKNOWN!r}) and the 6 sibling services = NOT_FOUND")


def list_services(channel, version):
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    if version == "v1":
        call = channel.stream_stream(
            REFLECTION_V1,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
    else:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    responses = list(call(iter([request]), timeout=RPC_TIMEOUT))
    if len(responses) != 1:
        raise CheckFailed(f"reflection {version}: {len(responses)} responses to one request")
    r = responses[0]
    if r.WhichOneof("message_response") != "list_services_response":
        err = r.error_response
        raise CheckFailed(
            f"reflection {version}: {r.WhichOneof('message_response')} "
            f"({err.error_code}: {err.error_message})"
        )
    return sorted(s.name for s in r.list_services_response.service)


def check_reflection(name, full, channel):
    for version in ("v1", "v1alpha"):
        try:
            listed = list_services(channel, version)
        except grpc.RpcError as e:
            fail(name, f"reflection {version} ListServices failed: {e.code().name}: {e.details()}")
        except CheckFailed as e:
            fail(name, str(e))
        if full not in listed:
            fail(name, f"reflection {version} lists {listed}, missing {full}")
        also = ALSO_SERVES.get(name, [])
        missing = [s for s in also if s not in listed]
        if missing:
            fail(name, f"reflection {version} lists {listed}, missing {missing}")
        others = [s for s in listed if s.startswith("sec.") and s != full and s not in also]
        if others:
            fail(name, f"reflection {version} lists other platform services {others}")
        if HEALTH not in listed:
            fail(name, f"reflection {version} lists {listed}, missing {HEALTH}")
        ok(name, f"reflection {version} lists {', '.join(listed)}")
    # The descriptors must be complete enough for a generic client to use the service.
    try:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        methods = [m.name for m in pool.FindServiceByName(full).methods]
    except (grpc.RpcError, KeyError, TypeError) as e:
        fail(name, f"cannot resolve {full} from reflection descriptors: {e}")
    # A skeleton service legitimately has no methods yet: report the count, don't judge it.
    count = f"{len(methods)} method" + ("" if len(methods) == 1 else "s")
    ok(name, f"reflection descriptors resolve {full} ({count})")
    return pool


def check_audit_auth(name, channel, pool, token):
    list_events = channel.unary_unary(
        LIST_EVENTS, request_serializer=lambda x: x, response_deserializer=lambda x: x
    )
    try:
        list_events(b"", timeout=RPC_TIMEOUT)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            fail(name, f"ListEvents without credentials = {e.code().name} ({e.details()}), want UNAUTHENTICATED")
        ok(name, "ListEvents without credentials = UNAUTHENTICATED")
    else:
        fail(name, "ListEvents without credentials succeeded, want UNAUTHENTICATED")

    try:
        response_type = message_class(pool.FindMessageTypeByName("sec.audit.v1.ListEventsResponse"))
    except KeyError as e:
        fail(name, f"reflection does not describe sec.audit.v1.ListEventsResponse: {e}")
    metadata = [("authorization", "Bearer " + token)]
    want = {f"sec.{s}.service.started" for s in SERVICES}
    deadline = time.monotonic() + EVENTS_WAIT
    while True:
        try:
            raw = list_events(b"", metadata=metadata, timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            fail(name, f"ListEvents with the admin token = {e.code().name} ({e.details()}), want OK")
        # An empty list still encodes its (empty) page field, so "non-empty bytes" alone
        # proves little: decode and look for the events themselves.
        types = {e.type for e in response_type.FromString(raw).events}
        if raw and want <= types:
            break
        if time.monotonic() > deadline:
            fail(
                name,
                f"ListEvents with the admin token: after {EVENTS_WAIT:.0f}s {len(raw)} bytes, "
                f"missing started events {sorted(want - types)}",
            )
        time.sleep(0.2)
    ok(name, f"ListEvents with the admin token = OK ({len(raw)} bytes; all 7 started events)")


def check_service(name, addr, token):
    full = SERVICES[name]
    channel = grpc.insecure_channel(addr)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT)
        except grpc.FutureTimeoutError:
            fail(name, f"cannot connect to {addr} within {CONNECT_TIMEOUT:.0f}s")
        ok(name, f"connected to {addr} ({full})")
        check_health(name, full, channel)
        pool = check_reflection(name, full, channel)
        if name == "audit":
            check_audit_auth(name, channel, pool, token)
    finally:
        channel.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--token-file", required=True, help="secd's admin.token")
    p.add_argument("targets", nargs="+", metavar="NAME=HOST:PORT")
    args = p.parse_args()

    targets = {}
    for t in args.targets:
        name, sep, addr = t.partition("=")
        if not sep or name not in SERVICES or not addr:
            p.error(f"bad target {t!r}: want NAME=HOST:PORT with NAME in {' '.join(SERVICES)}")
        targets[name] = addr
    missing = [s for s in SERVICES if s not in targets]
    if missing:
        p.error(f"no address for {' '.join(missing)}")
    with open(args.token_file, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        p.error(f"{args.token_file} is empty")

    print(f"grpcio {grpc.__version__}: checking {len(targets)} services", flush=True)
    failures = []
    for name, addr in targets.items():
        try:
            check_service(name, addr, token)
        except CheckFailed as e:
            print(f"  FAIL  {e}", flush=True)
            failures.append(str(e))
        except Exception as e:  # a client-side surprise is a failure too, not a traceback
            msg = f"{name}: unexpected {type(e).__name__}: {e}"
            print(f"  FAIL  {msg}", flush=True)
            failures.append(msg)
    serving = len(targets) - len(failures)
    if failures:
        print(f"interop checks FAILED for {len(failures)}/{len(targets)} services:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print(f"all checks passed: {serving}/{len(targets)} services SERVING", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
