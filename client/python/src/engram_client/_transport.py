"""Connection settings and the retry policy shared by Client and AsyncClient.

Nothing here opens a channel: each client builds its own (grpc or grpc.aio)
from the credentials, options and metadata computed here.
"""
from __future__ import annotations

import dataclasses
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"

#: What root_certificates accepts: PEM bytes, or the path of a PEM file.
RootCertificates = Union[bytes, str, "os.PathLike[str]", None]
ChannelOptions = Optional[Sequence[Tuple[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a client needs besides the channel itself.

    Attributes:
      target: host:port of engramd.
      credentials: TLS channel credentials, or None for plaintext.
      options: gRPC channel arguments.
      metadata: metadata sent with every call (the bearer token).
      timeout: per-attempt deadline in seconds (None: no deadline).
      retries: retries after an UNAVAILABLE answer (attempts = 1 + retries).
      backoff: base delay of the first retry, in seconds.
      max_backoff: cap on any retry delay, in seconds.
    """

    target: str
    credentials: Optional[grpc.ChannelCredentials]
    options: List[Tuple[str, Any]]
    metadata: Tuple[Tuple[str, str], ...]
    timeout: Optional[float]
    retries: int
    backoff: float
    max_backoff: float

    def deadline(self, timeout: Optional[float]) -> Optional[float]:
        """Returns the per-attempt deadline for a call's `timeout` argument."""
        return self.timeout if timeout is None else timeout

    def should_retry(self, error: grpc.RpcError, retries_done: int) -> bool:
        """True when `error` is UNAVAILABLE and retries remain; never for
        another code (a write that failed otherwise may have landed)."""
        code = error.code() if hasattr(error, "code") else None
        return code == grpc.StatusCode.UNAVAILABLE and retries_done < self.retries

    def retry_delay(self, retries_done: int, rng: random.Random) -> float:
        """Delay before retry number retries_done + 1: exponential with jitter,
        uniform in [d / 2, d] for d = min(max_backoff, backoff * 2**retries_done)."""
        d = min(self.max_backoff, self.backoff * (2.0 ** retries_done))
        return rng.uniform(d / 2.0, d)


def load_root_certificates(root_certificates: RootCertificates) -> Optional[bytes]:
    """Returns PEM bytes: `root_certificates` itself, or the file it names."""
    if root_certificates is None or isinstance(root_certificates, bytes):
        return root_certificates
    with open(os.fspath(root_certificates), "rb") as f:
        return f.read()


def make_settings(target: str, *, token: Optional[str], tls: bool,
                  root_certificates: RootCertificates, timeout: Optional[float], retries: int,
                  backoff: float, max_backoff: float, options: ChannelOptions) -> Settings:
    """Validates the client constructor's arguments and returns Settings.

    TLS is on when `tls` is true or root certificates are given; without
    root certificates the system's roots verify the server. Raises
    ValueError for negative retries or backoff.
    """
    if retries < 0:
        raise ValueError("retries must be >= 0, got %r" % retries)
    if backoff < 0 or max_backoff < 0:
        raise ValueError("backoff and max_backoff must be >= 0")
    roots = load_root_certificates(root_certificates)
    credentials = None
    if tls or roots is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    # Reconnect attempts follow the retry backoff, so a retry after a refused
    # connection dials again instead of failing on the channel's own (1 s
    # initial) reconnect backoff.
    backoff_ms = max(1, int(backoff * 1000))
    merged: Dict[str, Any] = {
        "grpc.max_receive_message_length": -1,
        "grpc.max_send_message_length": -1,
        "grpc.initial_reconnect_backoff_ms": backoff_ms,
        "grpc.min_reconnect_backoff_ms": backoff_ms,
        "grpc.max_reconnect_backoff_ms": max(backoff_ms, int(max_backoff * 1000)),
        # Calls spread over every address the target names or resolves to
        # (replicas: "ipv4:h1:p,h2:p" or a headless Service's DNS name).
        "grpc.lb_policy_name": "round_robin",
    }
    for key, value in options or ():
        merged[key] = value
    metadata: Tuple[Tuple[str, str], ...] = ()
    if token is not None:
        metadata = (("authorization", "Bearer " + token),)
    return Settings(target=target, credentials=credentials, options=list(merged.items()),
                    metadata=metadata, timeout=timeout, retries=int(retries),
                    backoff=float(backoff), max_backoff=float(max_backoff))
