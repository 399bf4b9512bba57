"""AsyncClient: the asyncio Engram client on a grpc.aio channel.

    async with engram_client.AsyncClient("127.0.0.1:50051") as c:
        await c.create_bank("demo", 64)
        ids = await c.store("demo", patterns)
        async for frame in c.sample_stream("demo", count=4, steps=32):
            print(frame.step, frame.sigma)

Same methods, arguments, results and errors as Client (requests and
responses go through the same conversion functions); every method is a
coroutine and sample_stream is an async generator. Create it inside a
running event loop and use it from that loop only.
"""
from __future__ import annotations

import asyncio
import random
from typing import Any, AsyncIterator, Callable, Iterable, List, Optional, Sequence, Union

import grpc
import grpc.aio
import numpy as np

from . import _convert
from ._gen.engram.v1 import engram_pb2_grpc as pb_grpc
from ._transport import DEFAULT_TARGET, ChannelOptions, RootCertificates, make_settings
from .errors import error_from_rpc
from .types import BackupResult, BankInfo, EnergyResult, Patterns, RetrieveResult, SampleFrame, \
    SampleResponse

__all__ = ["AsyncClient"]


class AsyncClient:
    """asyncio client of one engramd; see engram_client.Client for the
    arguments, results and errors of each method."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: Optional[str] = None,
                 tls: bool = False, root_certificates: RootCertificates = None,
                 timeout: Optional[float] = 30.0, retries: int = 3, backoff: float = 0.1,
                 max_backoff: float = 5.0, options: ChannelOptions = None,
                 interceptors: Optional[Sequence[Any]] = None) -> None:
        """Opens a grpc.aio channel to `target`; arguments as for Client
        (interceptors are grpc.aio client interceptors)."""
        self._settings = make_settings(target, token=token, tls=tls,
                                       root_certificates=root_certificates, timeout=timeout,
                                       retries=retries, backoff=backoff,
                                       max_backoff=max_backoff, options=options)
        s = self._settings
        if s.credentials is None:
            self._channel = grpc.aio.insecure_channel(s.target, options=s.options,
                                                      interceptors=interceptors)
        else:
            self._channel = grpc.aio.secure_channel(s.target, s.credentials, options=s.options,
                                                    interceptors=interceptors)
        self._stub = pb_grpc.MemoryServiceStub(self._channel)
        self._rng = random.Random()

    @property
    def target(self) -> str:
        """The server address this client talks to."""
        return self._settings.target

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying grpc.aio channel."""
        return self._channel

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        """Returns self; the channel is closed on exit."""
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        """Closes the client."""
        await self.close()

    # -- transport ---------------------------------------------------------

    async def _call(self, method: Callable[..., Any], request: Any,
                    timeout: Optional[float]) -> Any:
        s = self._settings
        retries_done = 0
        while True:
            try:
                return await method(request, timeout=s.deadline(timeout), metadata=s.metadata)
            except grpc.RpcError as e:
                if not s.should_retry(e, retries_done):
                    raise error_from_rpc(e) from e
            await asyncio.sleep(s.retry_delay(retries_done, self._rng))
            retries_done += 1

    async def _stream(self, request: Any, timeout: Optional[float]) -> AsyncIterator[SampleFrame]:
        s = self._settings
        count = _convert.sample_count(request)
        retries_done = 0
        while True:
            call = self._stub.SampleStream(request, timeout=s.deadline(timeout),
                                           metadata=s.metadata)
            received = False
            try:
                async for frame in call:
                    received = True
                    yield _convert.decode_frame(frame, count)
                return
            except grpc.RpcError as e:
                if received or not s.should_retry(e, retries_done):
                    raise error_from_rpc(e) from e
            finally:
                call.cancel()
            await asyncio.sleep(s.retry_delay(retries_done, self._rng))
            retries_done += 1

    # -- banks ---------------------------------------------------------------

    async def create_bank(self, name: str, dim: int, kind: _convert.EnumLike = "continuous", *,
                          energy: _convert.EnergyLike = None, beta: Optional[float] = None,
                          degree: Optional[int] = None, precision: _convert.EnumLike = None,
                          value_dim: int = 0, ttl_seconds: int = 0,
                          decay_half_life_seconds: int = 0,
                          timeout: Optional[float] = None) -> BankInfo:
        """Creates an empty bank and returns its description (see Client.create_bank)."""
        req = _convert.create_bank_request(name, dim, kind, energy=energy, beta=beta,
                                           degree=degree, precision=precision,
                                           value_dim=value_dim, ttl_seconds=ttl_seconds,
                                           decay_half_life_seconds=decay_half_life_seconds)
        return _convert.decode_bank_info(await self._call(self._stub.CreateBank, req, timeout))

    async def get_bank(self, name: str, *, timeout: Optional[float] = None) -> BankInfo:
        """Returns the description of bank `name`. Raises NotFound if absent."""
        req = _convert.get_bank_request(name)
        return _convert.decode_bank_info(await self._call(self._stub.GetBank, req, timeout))

    async def list_banks(self, *, timeout: Optional[float] = None) -> List[BankInfo]:
        """Returns every bank, ordered by name."""
        req = _convert.list_banks_request()
        return _convert.decode_list_banks(await self._call(self._stub.ListBanks, req, timeout))

    async def delete_bank(self, name: str, *, timeout: Optional[float] = None) -> None:
        """Deletes bank `name` and all its patterns. Raises NotFound if absent."""
        await self._call(self._stub.DeleteBank, _convert.delete_bank_request(name), timeout)

    # -- patterns ------------------------------------------------------------

    async def store(self, bank: str, patterns: Any, ids: Optional[Iterable[int]] = None,
                    payloads: Optional[Iterable[Union[bytes, str]]] = None,
                    values: Any = None, labels: Optional[Iterable[_convert.LabelsLike]] = None,
                    ttl_seconds: int = 0, *,
                    timeout: Optional[float] = None) -> np.ndarray:
        """Stores patterns atomically and durably; returns their uint64 ids
        (see Client.store)."""
        req = _convert.store_request(bank, patterns, ids, payloads, values, labels, ttl_seconds)
        return _convert.decode_store(await self._call(self._stub.Store, req, timeout))

    async def get_patterns(self, bank: str, ids: Optional[Iterable[int]] = None, *,
                           page_start: int = 0, page_size: int = 0,
                           timeout: Optional[float] = None) -> Patterns:
        """Reads stored patterns back by id or by page (see Client.get_patterns)."""
        req = _convert.get_patterns_request(bank, ids, page_start, page_size)
        return _convert.decode_patterns(await self._call(self._stub.GetPatterns, req, timeout))

    async def delete_patterns(self, bank: str, ids: Iterable[int], *,
                              timeout: Optional[float] = None) -> int:
        """Deletes patterns by id atomically; returns how many were deleted."""
        req = _convert.delete_patterns_request(bank, ids)
        return _convert.decode_delete_patterns(
            await self._call(self._stub.DeletePatterns, req, timeout))

    # -- compute -------------------------------------------------------------

    async def retrieve(self, bank: str, queries: Any, *, timeout: Optional[float] = None,
                       **options: Any) -> List[RetrieveResult]:
        """Runs energy descent from each query; returns one result per query
        (options as for Client.retrieve)."""
        req = _convert.retrieve_request(bank, queries, **options)
        return _convert.decode_retrieve(await self._call(self._stub.Retrieve, req, timeout))

    async def energy(self, bank: str, states: Any, gradient: bool = False, *,
                     energy: _convert.EnergyLike = None, beta: Optional[float] = None,
                     degree: Optional[int] = None, queue_timeout_ms: int = 0,
                     filter: _convert.FilterLike = None, novelty: bool = False,
                     timeout: Optional[float] = None) -> EnergyResult:
        """Evaluates E(x) (and grad E(x) when `gradient`) at each state
        (see Client.energy)."""
        req, batch = _convert.energy_request(bank, states, gradient=gradient, energy=energy,
                                             beta=beta, degree=degree,
                                             queue_timeout_ms=queue_timeout_ms,
                                             filter=filter, novelty=novelty)
        return _convert.decode_energy(await self._call(self._stub.Energy, req, timeout), batch)

    async def sample(self, bank: str, count: int = 1, *, timeout: Optional[float] = None,
                     **options: Any) -> SampleResponse:
        """Draws `count` samples (options as for Client.sample)."""
        req = _convert.sample_request(bank, count, **options)
        return _convert.decode_sample(await self._call(self._stub.Sample, req, timeout))

    def sample_stream(self, bank: str, count: int = 1, *, timeout: Optional[float] = None,
                      **options: Any) -> AsyncIterator[SampleFrame]:
        """Returns an async generator of SampleFrames (see Client.sample_stream);
        options are checked here, before any call is made."""
        req = _convert.sample_request(bank, count, **options)
        return self._stream(req, timeout)

    # -- operations ----------------------------------------------------------

    async def backup(self, file: str, *, timeout: Optional[float] = None) -> BackupResult:
        """Writes a snapshot of every bank on the server (see Client.backup)."""
        req = _convert.backup_request(file)
        return _convert.decode_backup(await self._call(self._stub.Backup, req, timeout))
