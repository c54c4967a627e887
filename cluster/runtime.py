"""Ray on this machine or at an address: the one place that starts or joins one.

    start_local_ray(...)          a Ray whose only node is this machine, listening on 127.0.0.1 only
    join_ray(address, ...)        probe the address (one gRPC call, `timeout_s`), then ray.init
    local_rays()                  the Rays running on this machine, with the command that started each
    pick_local_ray(rays)          the one to use when no address is given (refuses to guess)

Every refusal is an EngramError that says what to change, raised in about `timeout_s` instead of
Ray's own retry loop (tens of seconds of C++ log lines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import ray

from engram_store.engine.errors import ConfigError, EngramError, ShardUnavailable

log = logging.getLogger(__name__)

#: the checkout, put on the workers' PYTHONPATH so actors import it even when not pip-installed
ROOT = pathlib.Path(__file__).resolve().parents[1]

LOOPBACK = "127.0.0.1"
#: a GCS method every Ray answers; its request is empty, so no Ray protobufs are needed here
_GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
_DEFAULT_TOKEN = pathlib.Path.home() / ".ray" / "auth_token"


class RayUnreachable(ShardUnavailable):
    """Nothing answers at the Ray address given."""

    hint = "give the Ray head's GCS address (host:6379), or leave --address out for a local Ray"


class RayAuthRequired(EngramError):
    """The Ray cluster requires its token, and this process does not send one."""

    code = "UNAUTHENTICATED"
    hint = (
        f"run the command with {AUTH_MODE_ENV}=token and the cluster's token in "
        "~/.ray/auth_token, $RAY_AUTH_TOKEN or the file $RAY_AUTH_TOKEN_PATH"
    )


class RayTokenRefused(EngramError):
    """The Ray cluster refused the token this process sends."""

    code = "UNAUTHENTICATED"
    hint = (
        "give the cluster's own token: RAY_AUTH_TOKEN=... or RAY_AUTH_TOKEN_PATH=FILE "
        "(`ray get-auth-token` on the head prints it)"
    )


class SeveralRays(ConfigError):
    """More than one Ray runs on this machine and no --address says which to use."""

    hint = "add one of the --address flags listed to the command"


class NoLocalRay(RayUnreachable):
    """No Ray runs on this machine and no --address was given."""

    hint = "start one (`engram cluster up`, `ray start --head`) or give --address"


def ray_token() -> tuple[str, str]:
    """The token Ray would send in token mode and where it comes from, as Ray looks for it:
    $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. ("", "") when none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = pathlib.Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or _DEFAULT_TOKEN).expanduser()
    try:
        return path.read_text().strip(), str(path)
    except OSError:
        return "", ""


def _token_mode() -> bool:
    return os.environ.get(AUTH_MODE_ENV, "").lower() == "token"


def probe_gcs(address: str, timeout_s: float = 5.0, *, use_token: bool | None = None) -> bool:
    """Check, with one gRPC call of at most `timeout_s`, that a Ray GCS answers at "host:port"
    and accepts this process. Returns whether it requires a token (which this process has).

    `use_token`: send the token (default: when RAY_AUTH_MODE=token, as ray.init would).
    Raises RayUnreachable (nothing answers, or no Ray answers), RayAuthRequired (a token is
    needed and not sent) or RayTokenRefused (the token sent is not the cluster's).
    """
    send = _token_mode() if use_token is None else use_token
    token, source = ray_token()
    if send and not token:
        raise RayAuthRequired(
            f"{AUTH_MODE_ENV}=token, but this machine has no Ray token (`ray get-auth-token` "
            "on the head prints the cluster's)"
        )
    metadata = (("authorization", f"Bearer {token}"),) if send else ()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(_GCS_PROBE)  # raw bytes in and out
        try:
            call(b"", timeout=timeout_s, metadata=metadata)
            return send
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            details = e.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAUTHENTICATED and not send:
        if token and probe_gcs(address, timeout_s, use_token=True):
            raise RayAuthRequired(
                f"the Ray at {address} requires token authentication, and this command did not "
                f"send a token; {AUTH_MODE_ENV}=token sends the one in {source}, which it accepts"
            )
        raise RayAuthRequired(
            f"the Ray at {address} requires token authentication, and this machine has no Ray "
            "token (`ray get-auth-token` on the head prints the cluster's)"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise RayTokenRefused(f"the Ray at {address} refused the token from {source}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        raise RayUnreachable(
            f"{address} answers, but it is no Ray GCS (an engram shard?); give the Ray head's "
            "address (`ray start --head` prints it, default port 6379)"
        )
    raise RayUnreachable(
        f"no Ray answers at {address} within {timeout_s:g}s ({code.name}: {details}); give the "
        "head's GCS address (`ray start --head` prints it), or raise --timeout"
    )


@contextlib.contextmanager
def _keep_loopback() -> Iterator[None]:
    """While ray.init runs: keep 127.0.0.1 as given. Ray replaces a loopback node address by the
    machine's reachable IP, and its servers then listen on every interface; with 127.0.0.1 they
    listen on loopback only, and a driver reaches a loopback GCS only if it keeps the address."""
    from ray._private import services

    resolve = services.resolve_ip_for_localhost

    def keep(host: str) -> str:
        return host if host == LOOPBACK else resolve(host)

    services.resolve_ip_for_localhost = keep
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = resolve


def start_local_ray(
    *, num_cpus: int, resources: dict[str, float], namespace: str, log_to_driver: bool = False
) -> str:
    """Start a Ray whose only node is this machine, every server of it listening on 127.0.0.1,
    with at least `num_cpus` logical CPUs (never fewer than the machine has) and the given custom
    resources; this process is connected to it and it ends with this process. Returns its GCS
    address (127.0.0.1:PORT)."""
    with _keep_loopback():
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            num_cpus=max(os.cpu_count() or 1, num_cpus),
            resources=dict(resources),
            include_dashboard=False,
            namespace=namespace,
            log_to_driver=log_to_driver,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    address = ray.get_runtime_context().gcs_address
    log.info(
        "started a local Ray at %s (namespace %r, resources %s)", address, namespace, resources
    )
    return address


def join_ray(
    address: str, *, namespace: str, timeout_s: float = 5.0, log_to_driver: bool = False
) -> str:
    """Connect this process to the Ray at "host:port" (or "ray://..." / "auto", passed to Ray
    unprobed) after probing it, so that a dead address, a missing or a wrong token fail within
    about `timeout_s` and change nothing. Returns the GCS address."""
    if address != "auto" and "://" not in address:
        host, port = _split(address)
        if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
            _probe_tcp(host, port, timeout_s)  # a TLS GCS: the plaintext probe cannot talk to it
        else:
            probe_gcs(address, timeout_s)
    try:
        with _keep_loopback():
            ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver)
    except ConnectionError as e:
        raise RayUnreachable(f"cannot connect to Ray at {address!r}: {e}") from None
    return ray.get_runtime_context().gcs_address


def _probe_tcp(host: str, port: int, timeout_s: float) -> None:
    """RayUnreachable unless something accepts TCP connections at host:port within timeout_s."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayUnreachable(
            f"no Ray answers at {host}:{port} within {timeout_s:g}s ({e}); give the head's GCS "
            "address (`ray start --head` prints it), or raise --timeout"
        ) from None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    return host, int(port)


@dataclass(frozen=True)
class LocalRay:
    """A Ray running on this machine: its GCS address and the process that started it."""

    address: str
    starter_pid: int  # 0 when it was started by `ray start` (its starter has exited)
    starter: str  # the starter's command line, or "ray start"

    def describe(self) -> str:
        by = f"pid {self.starter_pid}: {self.starter}" if self.starter_pid else self.starter
        return f"{self.address}  (started by {by})"


def local_rays() -> list[LocalRay]:
    """The Rays running on this machine, found from their raylets' command lines (as Ray's
    `address="auto"` does), sorted by address. Several raylets of one Ray count once."""
    import psutil

    found: dict[str, LocalRay] = {}
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if not cmdline or os.path.basename(cmdline[0].split(" ")[0]) != "raylet":
                continue
            args = " ".join(cmdline).split(" ")
            gcs = [a.split("=", 1)[1] for a in args if a.startswith("--gcs-address=")]
            if not gcs or gcs[0] in found:
                continue
            found[gcs[0]] = _starter(gcs[0], proc.info["ppid"])
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return [found[a] for a in sorted(found)]


def _starter(address: str, ppid: int) -> LocalRay:
    """The process that started the Ray whose raylet has parent `ppid`: the driver for a Ray
    that ray.init() started; gone (reparented to init) for `ray start`."""
    import psutil

    if ppid > 1:
        try:
            parent = psutil.Process(ppid)
            cmd = " ".join(parent.cmdline())
            if "ray start" not in cmd and "ray/scripts" not in cmd:
                return LocalRay(address, ppid, _short(cmd))
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            pass
    return LocalRay(address, 0, "ray start")


def _short(cmd: str, limit: int = 120) -> str:
    """A command line without its interpreter path, cut to `limit` characters."""
    parts = cmd.split(" ")
    if parts and os.path.basename(parts[0]).startswith("python"):
        parts = parts[1:]
        if parts[:2] == ["-m", "engram"]:
            parts = ["engram", *parts[2:]]
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pick_local_ray(rays: list[LocalRay]) -> LocalRay:
    """The Ray to use when no address is given: the only one running here. Refuses, listing
    them, when there are several (never picks one silently), and says so when there is none."""
    if not rays:
        raise NoLocalRay("no Ray runs on this machine, and no --address says where one runs")
    if len(rays) > 1:
        listing = "\n".join(f"  --address {r.describe()}" for r in rays)
        raise SeveralRays(
            f"{len(rays)} Rays run on this machine, and no --address says which one to use:\n"
            f"{listing}"
        )
    return rays[0]
