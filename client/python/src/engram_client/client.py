"""Client: the synchronous Engram client on a grpc channel.

    import numpy as np
    import engram_client

    with engram_client.Client("127.0.0.1:50051") as c:
        c.create_bank("demo", 64, "continuous", energy="lse", beta=8.0)
        ids = c.store("demo", np.random.randn(10, 64))
        [r] = c.retrieve("demo", noisy_query)
        print(r.nearest.id, r.state)

Thread-safety: a Client may be shared by threads; each call is independent.
Close it (or use `with`) to release the channel.
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Union

import grpc
import numpy as np

from . import _convert
from ._gen.engram.v1 import engram_pb2_grpc as pb_grpc
from ._transport import DEFAULT_TARGET, ChannelOptions, RootCertificates, make_settings
from .errors import error_from_rpc
from .types import BackupResult, BankInfo, EnergyResult, Patterns, RetrieveResult, SampleFrame, \
    SampleResponse

__all__ = ["Client"]


class Client:
    """Synchronous client of one engramd (engram.v1.MemoryService).

    Every method raises an engram_client.EngramError subclass when the call
    fails (NotFound, InvalidArgument, ...; the server's message in
    `.message`), and ValueError / TypeError for arguments it cannot encode.
    Calls answered UNAVAILABLE are retried `retries` times with jittered
    exponential backoff; no other code is retried.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: Optional[str] = None,
                 tls: bool = False, root_certificates: RootCertificates = None,
                 timeout: Optional[float] = 30.0, retries: int = 3, backoff: float = 0.1,
                 max_backoff: float = 5.0, options: ChannelOptions = None,
                 interceptors: Optional[Sequence[Any]] = None) -> None:
        """Opens a channel to `target` (host:port); connects lazily.

        Args:
          target: engramd's gRPC address.
          token: bearer token, sent as `authorization: Bearer <token>`.
          tls: use TLS (verified against the system roots unless
            root_certificates is given).
          root_certificates: PEM bytes or the path of a PEM file; implies TLS.
          timeout: default deadline of each attempt, in seconds (None: none).
            Every method also takes `timeout=` for one call.
          retries: retries after UNAVAILABLE (0 disables retrying).
          backoff: delay before the first retry, in seconds; doubles per
            retry, jittered to [d/2, d], capped at max_backoff.
          max_backoff: cap of a retry delay, in seconds.
          options: extra gRPC channel arguments, e.g.
            [("grpc.ssl_target_name_override", "engram.example")].
          interceptors: grpc client interceptors applied to the channel.
        """
        self._settings = make_settings(target, token=token, tls=tls,
                                       root_certificates=root_certificates, timeout=timeout,
                                       retries=retries, backoff=backoff,
                                       max_backoff=max_backoff, options=options)
        s = self._settings
        if s.credentials is None:
            channel = grpc.insecure_channel(s.target, options=s.options)
        else:
            channel = grpc.secure_channel(s.target, s.credentials, options=s.options)
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._channel = channel
        self._stub = pb_grpc.MemoryServiceStub(channel)
        self._rng = random.Random()

    @property
    def target(self) -> str:
        """The server address this client talks to."""
        return self._settings.target

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, e.g. for `engram_client.pb_grpc` stubs."""
        return self._channel

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> "Client":
        """Returns self; the channel is closed on exit."""
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Closes the client."""
        self.close()

    # -- transport ---------------------------------------------------------

    def _call(self, method: Callable[..., Any], request: Any, timeout: Optional[float]) -> Any:
        s = self._settings
        retries_done = 0
        while True:
            try:
                return method(request, timeout=s.deadline(timeout), metadata=s.metadata)
            except grpc.RpcError as e:
                if not s.should_retry(e, retries_done):
                    raise error_from_rpc(e) from e
            time.sleep(s.retry_delay(retries_done, self._rng))
            retries_done += 1

    def _stream(self, request: Any, timeout: Optional[float]) -> Iterator[SampleFrame]:
        s = self._settings
        count = _convert.sample_count(request)
        retries_done = 0
        while True:
            call = self._stub.SampleStream(request, timeout=s.deadline(timeout),
                                           metadata=s.metadata)
            received = False
            try:
                for frame in call:
                    received = True
                    yield _convert.decode_frame(frame, count)
                return
            except grpc.RpcError as e:
                if received or not s.should_retry(e, retries_done):
                    raise error_from_rpc(e) from e
            finally:
                call.cancel()
            time.sleep(s.retry_delay(retries_done, self._rng))
            retries_done += 1

    # -- banks ---------------------------------------------------------------

    def create_bank(self, name: str, dim: int, kind: _convert.EnumLike = "continuous", *,
                    energy: _convert.EnergyLike = None, beta: Optional[float] = None,
                    degree: Optional[int] = None, precision: _convert.EnumLike = None,
                    value_dim: int = 0, ttl_seconds: int = 0,
                    decay_half_life_seconds: int = 0,
                    timeout: Optional[float] = None) -> BankInfo:
        """Creates an empty bank and returns its description.

        Args:
          name: bank name, [a-z0-9][a-z0-9_.-]{0,63}.
          dim: dimension N of every pattern.
          kind: "continuous" or "bipolar" (or a pb.StateKind value).
          energy: default energy: a family name ("lse", "polynomial", ...),
            a pb.EnergyFamily value, an EnergySpec or a pb.EnergyConfig;
            None takes the kind's default (lse / classical).
          beta, degree: set on the energy (inverse temperature; degree n).
          precision: "f32" (default), "bf16", "bit_packed", "f32_screened".
          value_dim: M > 0 makes a key -> value (hetero-associative) bank:
            every pattern carries a value of M floats, and retrieve and
            energy read out sum_mu p_mu v_mu. 0: no values.
          ttl_seconds: default time to live of stored patterns (0: none).
          decay_half_life_seconds: half-life of a pattern's weight (0: no
            decay): a pattern stored `age` ago weighs 2^(-age / half-life)
            in the softmax. Softmax energies on continuous banks only.

        Raises:
          AlreadyExists if the name is taken; InvalidArgument for a bad name,
          dim, kind or energy; FailedPrecondition for an energy the kind
          does not take.
        """
        req = _convert.create_bank_request(name, dim, kind, energy=energy, beta=beta,
                                           degree=degree, precision=precision,
                                           value_dim=value_dim, ttl_seconds=ttl_seconds,
                                           decay_half_life_seconds=decay_half_life_seconds)
        return _convert.decode_bank_info(self._call(self._stub.CreateBank, req, timeout))

    def get_bank(self, name: str, *, timeout: Optional[float] = None) -> BankInfo:
        """Returns the description of bank `name`. Raises NotFound if absent."""
        req = _convert.get_bank_request(name)
        return _convert.decode_bank_info(self._call(self._stub.GetBank, req, timeout))

    def list_banks(self, *, timeout: Optional[float] = None) -> List[BankInfo]:
        """Returns every bank, ordered by name."""
        req = _convert.list_banks_request()
        return _convert.decode_list_banks(self._call(self._stub.ListBanks, req, timeout))

    def delete_bank(self, name: str, *, timeout: Optional[float] = None) -> None:
        """Deletes bank `name` and all its patterns. Raises NotFound if absent."""
        self._call(self._stub.DeleteBank, _convert.delete_bank_request(name), timeout)

    # -- patterns ------------------------------------------------------------

    def store(self, bank: str, patterns: Any, ids: Optional[Iterable[int]] = None,
              payloads: Optional[Iterable[Union[bytes, str]]] = None,
              values: Any = None, labels: Optional[Iterable[_convert.LabelsLike]] = None,
              ttl_seconds: int = 0, *,
              timeout: Optional[float] = None) -> np.ndarray:
        """Stores patterns atomically and durably; returns their uint64 ids.

        Args:
          bank: target bank.
          patterns: (K, N) or (N,) array (cast to float32); bipolar banks
            accept only +1 / -1.
          ids: one id per pattern in [0, 2**64), or None for fresh ids.
          payloads: one bytes (or str, stored as UTF-8) per pattern, or None.
          values: (K, M) array (cast to float32), one finite value per
            pattern: required by a bank with value_dim M, refused by others.
          labels: one dict per pattern, {key: str | int}: str values are
            string labels, int values (not bool) integer labels, which
            `filter=` selects on; None for no labels. TypeError for other
            types.
          ttl_seconds: time to live of these patterns; 0 takes the bank's.
            An expired pattern leaves every read at once and is deleted
            within the server's expiry interval.

        Raises:
          NotFound for an unknown bank; InvalidArgument for a wrong dimension,
          non-finite or misshaped values, or bad labels; AlreadyExists for an
          id already in the bank. Nothing is stored when a call fails.

        A retry after UNAVAILABLE may store server-assigned ids twice if the
        first attempt landed; pass `ids` to make retries exact (a landed id
        then answers AlreadyExists).
        """
        req = _convert.store_request(bank, patterns, ids, payloads, values, labels, ttl_seconds)
        return _convert.decode_store(self._call(self._stub.Store, req, timeout))

    def get_patterns(self, bank: str, ids: Optional[Iterable[int]] = None, *,
                     page_start: int = 0, page_size: int = 0,
                     timeout: Optional[float] = None) -> Patterns:
        """Reads stored patterns back, bit for bit.

        With `ids`: those patterns, in that order (NotFound if any is absent).
        Without: rows [page_start, page_start + page_size) in storage order
        (page_size 0 means 1000); continue from `.next_page_start`.
        The result also carries each pattern's value (`.values`, (K, M) or
        None), labels (`.labels`, dicts), expiry (`.expires_unix_ms`) and
        store time (`.stored_unix_ms`).
        """
        req = _convert.get_patterns_request(bank, ids, page_start, page_size)
        return _convert.decode_patterns(self._call(self._stub.GetPatterns, req, timeout))

    def delete_patterns(self, bank: str, ids: Iterable[int], *,
                        timeout: Optional[float] = None) -> int:
        """Deletes patterns by id atomically; returns how many were deleted.
        Raises NotFound (and deletes nothing) if any id is absent."""
        req = _convert.delete_patterns_request(bank, ids)
        return _convert.decode_delete_patterns(self._call(self._stub.DeletePatterns, req,
                                                          timeout))

    # -- compute -------------------------------------------------------------

    def retrieve(self, bank: str, queries: Any, *, timeout: Optional[float] = None,
                 **options: Any) -> List[RetrieveResult]:
        """Runs energy descent from each query; returns one result per query.

        Args:
          bank: the bank to recall from.
          queries: (B, N) or (N,) array (a vector is a batch of one).
          **options: keyword options of engram_client.retrieve_request:
            energy, beta, degree (an energy override), dynamics ("sync",
            "async", "gradient", "tinybrain"), max_steps, tol, alpha, dt,
            tau_v, tau_h, seed, return_trace, partial_on_deadline, clamp,
            queue_timeout_ms, filter. An unknown option raises TypeError.
            filter: recall only among the patterns whose labels pass, as if
            the bank held only those: a dict such as
            {"lang": ["en", "de"], "year": Range(2000, 2009)} or a pb.Filter
            (see engram_client.label_filter).

        Results of a bank with values carry the readout at the final state
        in `.value` (M floats).

        Raises:
          NotFound for an unknown bank; InvalidArgument for a wrong dimension,
          option or filter; FailedPrecondition when no pattern passes the
          filter; ResourceExhausted when the server's queue is full.
        """
        req = _convert.retrieve_request(bank, queries, **options)
        return _convert.decode_retrieve(self._call(self._stub.Retrieve, req, timeout))

    def energy(self, bank: str, states: Any, gradient: bool = False, *,
               energy: _convert.EnergyLike = None, beta: Optional[float] = None,
               degree: Optional[int] = None, queue_timeout_ms: int = 0,
               filter: _convert.FilterLike = None, novelty: bool = False,
               timeout: Optional[float] = None) -> EnergyResult:
        """Evaluates E(x) (and grad E(x) when `gradient`) at each state.

        Args:
          bank: the bank whose patterns define the energy.
          states: (B, N) or (N,) array of finite states.
          gradient: also return the gradients.
          energy, beta, degree: an energy override (the bank's default if None).
          queue_timeout_ms: longest wait in the server's queue (0 = default).
          filter: the energy of the patterns whose labels pass only (see
            retrieve); none passing gives the empty sum.
          novelty: also return each state's novelty relative to the bank's
            own memories (`.novelty`, `.novelty_z`).

        Returns:
          EnergyResult(energies float64 (B,), gradients float32 (B, N) or None),
          with `.values` float32 (B, M), the readout at each state, for a bank
          with values (else None). With `novelty`, `.novelty` float64 (B,):
          the fraction of the stored patterns' own energies below each state's
          energy, equal ones counting half, over min(K, 256) stored patterns
          (those whose ids hash smallest) under the same energy and
          filter; stored patterns sit at minima, so a state like them
          scores mid-range and one far from every memory near 1. And
          `.novelty_z` float64 (B,): (E(x) - mean) / population standard
          deviation of those stored energies (0 when all are equal). Both
          None when not requested.
        """
        req, batch = _convert.energy_request(bank, states, gradient=gradient, energy=energy,
                                             beta=beta, degree=degree,
                                             queue_timeout_ms=queue_timeout_ms,
                                             filter=filter, novelty=novelty)
        return _convert.decode_energy(self._call(self._stub.Energy, req, timeout), batch)

    def sample(self, bank: str, count: int = 1, *, timeout: Optional[float] = None,
               **options: Any) -> SampleResponse:
        """Draws `count` samples by reverse diffusion on the bank's energy.

        **options are the keyword options of engram_client.sample_request:
        energy, beta, degree, sampler, schedule, sigma_max, sigma_min, rho,
        steps, stop_at_sigma_min, seed, query, sigma_start, clamp, churn,
        s_tmin, s_tmax, s_noise, langevin_steps, langevin_eta,
        am_iterations, delta_memorized, delta_spurious, trajectory_every,
        queue_timeout_ms, filter (sample from the memories whose labels pass
        only, see retrieve; FailedPrecondition when none does). An unknown
        option raises TypeError.
        """
        req = _convert.sample_request(bank, count, **options)
        return _convert.decode_sample(self._call(self._stub.Sample, req, timeout))

    def sample_stream(self, bank: str, count: int = 1, *, timeout: Optional[float] = None,
                      **options: Any) -> Iterator[SampleFrame]:
        """Like sample, but yields SampleFrames as the states form.

        Frames come every `trajectory_every` steps (or every step); the last
        one carries the whole SampleResponse in `.result`. `timeout` bounds
        the whole stream. UNAVAILABLE is retried only before the first frame.
        Closing the generator early cancels the call. Options are checked
        here, before the generator is returned.
        """
        req = _convert.sample_request(bank, count, **options)
        return self._stream(req, timeout)

    # -- operations ----------------------------------------------------------

    def backup(self, file: str, *, timeout: Optional[float] = None) -> BackupResult:
        """Writes a consistent snapshot of every bank to <data_dir>/backups/<file>
        on the server. Raises AlreadyExists if the file exists."""
        req = _convert.backup_request(file)
        return _convert.decode_backup(self._call(self._stub.Backup, req, timeout))
