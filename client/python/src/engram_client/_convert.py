"""Pure conversions between Python values and engram.v1 messages.

Client and AsyncClient build every request and decode every response here,
so the two cannot drift. Nothing in this module does I/O.

Encoding rules:
  * Vectors: a (N,) array is a batch of one; (B, N) arrays travel row-major
    as packed little-endian float32 (written straight into the message's
    wire bytes, not element by element).
  * Enums: a lowercase name without the prefix ("bipolar", "lse", "async"),
    the full proto name ("STATE_KIND_BIPOLAR"), or a pb enum value. None
    means UNSPECIFIED (the server's default).
  * Ids: Python ints or an integer array, each in [0, 2**64).
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._gen.engram.v1 import engram_pb2 as pb
from .types import (BackupResult, BankInfo, Capacity, EnergyResult, EnergySpec, Memory,
                    Patterns, RetrieveResult, Sample, SampleFrame, SampleResponse,
                    TrajectoryPoint)

EnumLike = Union[str, int, None]
EnergyLike = Union[str, int, EnergySpec, "pb.EnergyConfig", None]
ArrayLike = Any

_PREFIX = {
    "StateKind": "STATE_KIND_",
    "Precision": "PRECISION_",
    "EnergyFamily": "ENERGY_FAMILY_",
    "Similarity": "SIMILARITY_",
    "Separation": "SEPARATION_",
    "Dynamics": "DYNAMICS_",
    "StopReason": "STOP_REASON_",
    "Sampler": "SAMPLER_",
    "ScheduleKind": "SCHEDULE_KIND_",
    "SampleClass": "SAMPLE_CLASS_",
}
_UINT64_END = 1 << 64


# ---------------------------------------------------------------------------
# Enums

def enum_value(enum_type: str, value: EnumLike) -> int:
    """Returns the number of `value` in the pb enum named `enum_type`.

    Raises ValueError for a name or number the enum does not define and
    TypeError for anything but str, int or None.
    """
    enum = getattr(pb, enum_type)
    prefix = _PREFIX[enum_type]
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError("%s must be a name or a pb.%s value, not %r"
                        % (enum_type, enum_type, value))
    if isinstance(value, int):
        if value not in enum.values():
            raise ValueError("%d is not a pb.%s value" % (value, enum_type))
        return int(value)
    key = value.strip().upper().replace("-", "_")
    if not key.startswith(prefix):
        key = prefix + key
    if key not in enum.keys():
        names = ", ".join(repr(k[len(prefix):].lower()) for k in enum.keys())
        raise ValueError("unknown %s %r; expected one of %s" % (enum_type, value, names))
    return enum.Value(key)


def enum_name(enum_type: str, number: int) -> str:
    """Returns the lowercase unprefixed name of `number` ("bipolar"), or the
    number as a string when this client's proto does not define it."""
    enum = getattr(pb, enum_type)
    try:
        return enum.Name(number)[len(_PREFIX[enum_type]):].lower()
    except ValueError:
        return str(number)


# ---------------------------------------------------------------------------
# Arrays

def as_batch(x: ArrayLike, what: str) -> np.ndarray:
    """Returns `x` as a C-contiguous float32 (B, N) array; (N,) becomes (1, N).

    Raises ValueError for other ranks or an empty dimension.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise ValueError("%s must be a vector (N,) or a batch (B, N), got shape %s"
                         % (what, a.shape))
    if a.shape[1] == 0:
        raise ValueError("%s has dimension 0" % what)
    return np.ascontiguousarray(a)


def _wire_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _append_packed(msg: Any, field: str, data: bytes) -> None:
    """Appends packed values (raw little-endian bytes) to repeated `field`."""
    if not data:
        return
    number = msg.DESCRIPTOR.fields_by_name[field].number
    msg.MergeFromString(_wire_varint(number << 3 | 2) + _wire_varint(len(data)) + data)


def _append_floats(msg: Any, field: str, a: np.ndarray) -> None:
    _append_packed(msg, field, np.ascontiguousarray(a, dtype="<f4").tobytes())


def _append_bools(msg: Any, field: str, mask: ArrayLike, what: str) -> None:
    m = np.asarray(mask)
    if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.number):
        raise TypeError("%s must be an array of booleans" % what)
    _append_packed(msg, field, (m.reshape(-1) != 0).astype(np.uint8).tobytes())


def as_ids(ids: Iterable[int], what: str = "ids") -> List[int]:
    """Returns `ids` as a list of Python ints, each checked to be in [0, 2**64)."""
    if isinstance(ids, np.ndarray):
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError("%s must be integers, got dtype %s" % (what, ids.dtype))
        values = ids.reshape(-1).tolist()
    elif isinstance(ids, (int, np.integer)):
        values = [ids]
    else:
        values = list(ids)
    out = []
    for v in values:
        i = operator.index(v)
        if not 0 <= i < _UINT64_END:
            raise ValueError("%s must be in [0, 2**64), got %d" % (what, i))
        out.append(i)
    return out


def _floats(values: Sequence[float], dtype: Any = np.float32) -> np.ndarray:
    return np.fromiter(values, dtype=dtype, count=len(values))


# ---------------------------------------------------------------------------
# Energy configuration

def energy_config(energy: EnergyLike = None, beta: Optional[float] = None,
                  degree: Optional[int] = None) -> Optional["pb.EnergyConfig"]:
    """Returns the pb.EnergyConfig for `energy` with `beta` / `degree` set.

    `energy` is a family name or pb.EnergyFamily value, an EnergySpec, or a
    pb.EnergyConfig (copied). Returns None (no override: the bank's default)
    when all three are None.
    """
    if energy is None and beta is None and degree is None:
        return None
    cfg = pb.EnergyConfig()
    if isinstance(energy, pb.EnergyConfig):
        cfg.CopyFrom(energy)
    elif isinstance(energy, EnergySpec):
        cfg.family = enum_value("EnergyFamily", energy.family)
        cfg.beta = float(energy.beta)
        cfg.degree = int(energy.degree)
        cfg.rectified = bool(energy.rectified)
        cfg.similarity = enum_value("Similarity", energy.similarity)
        cfg.separation = enum_value("Separation", energy.separation)
    else:
        cfg.family = enum_value("EnergyFamily", energy)
    if beta is not None:
        cfg.beta = float(beta)
    if degree is not None:
        cfg.degree = int(degree)
    return cfg


def energy_spec(cfg: "pb.EnergyConfig") -> EnergySpec:
    """Returns the EnergySpec (friendly names) of a pb.EnergyConfig."""
    return EnergySpec(family=enum_name("EnergyFamily", cfg.family), beta=cfg.beta,
                      degree=cfg.degree, rectified=cfg.rectified,
                      similarity=enum_name("Similarity", cfg.similarity),
                      separation=enum_name("Separation", cfg.separation))


# ---------------------------------------------------------------------------
# Requests

def create_bank_request(name: str, dim: int, kind: EnumLike = "continuous", *,
                        energy: EnergyLike = None, beta: Optional[float] = None,
                        degree: Optional[int] = None,
                        precision: EnumLike = None) -> "pb.CreateBankRequest":
    """Returns the CreateBankRequest for a bank `name` of dimension `dim`."""
    req = pb.CreateBankRequest(name=name, dim=operator.index(dim),
                               kind=enum_value("StateKind", kind),
                               precision=enum_value("Precision", precision))
    cfg = energy_config(energy, beta, degree)
    if cfg is not None:
        req.energy.CopyFrom(cfg)
    return req


def get_bank_request(name: str) -> "pb.GetBankRequest":
    """Returns the GetBankRequest for bank `name`."""
    return pb.GetBankRequest(name=name)


def list_banks_request() -> "pb.ListBanksRequest":
    """Returns the (empty) ListBanksRequest."""
    return pb.ListBanksRequest()


def delete_bank_request(name: str) -> "pb.DeleteBankRequest":
    """Returns the DeleteBankRequest for bank `name`."""
    return pb.DeleteBankRequest(name=name)


def store_request(bank: str, patterns: ArrayLike, ids: Optional[Iterable[int]] = None,
                  payloads: Optional[Iterable[Union[bytes, str]]] = None
                  ) -> "pb.StoreRequest":
    """Returns the StoreRequest for a (K, N) or (N,) array of patterns.

    `ids` (one per pattern, or None for server-assigned ids) and `payloads`
    (bytes, or str stored as UTF-8) are passed through; the server checks
    their counts.
    """
    req = pb.StoreRequest(bank=bank)
    _append_floats(req, "patterns", as_batch(patterns, "patterns"))
    if ids is not None:
        req.ids.extend(as_ids(ids))
    if payloads is not None:
        req.payloads.extend(p.encode("utf-8") if isinstance(p, str) else bytes(p)
                            for p in payloads)
    return req


def get_patterns_request(bank: str, ids: Optional[Iterable[int]] = None, page_start: int = 0,
                         page_size: int = 0) -> "pb.GetPatternsRequest":
    """Returns the GetPatternsRequest for `ids`, or for a page when ids is None."""
    req = pb.GetPatternsRequest(bank=bank, page_start=operator.index(page_start),
                                page_size=operator.index(page_size))
    if ids is not None:
        req.ids.extend(as_ids(ids))
    return req


def delete_patterns_request(bank: str, ids: Iterable[int]) -> "pb.DeletePatternsRequest":
    """Returns the DeletePatternsRequest for `ids`."""
    return pb.DeletePatternsRequest(bank=bank, ids=as_ids(ids))


def retrieve_request(bank: str, queries: ArrayLike, *, energy: EnergyLike = None,
                     beta: Optional[float] = None, degree: Optional[int] = None,
                     dynamics: EnumLike = None, max_steps: int = 0, tol: float = 0.0,
                     alpha: float = 0.0, dt: float = 0.0, tau_v: float = 0.0,
                     tau_h: float = 0.0, seed: int = 0, return_trace: bool = False,
                     partial_on_deadline: bool = False, clamp: Optional[ArrayLike] = None,
                     queue_timeout_ms: int = 0) -> "pb.RetrieveRequest":
    """Returns the RetrieveRequest for a (B, N) or (N,) array of queries.

    Args:
      energy, beta, degree: an energy override (see energy_config); None
        keeps the bank's default.
      dynamics: "sync" (default), "async", "gradient" or "tinybrain".
      max_steps, tol, alpha, dt, tau_v, tau_h, seed: the stopping rule and
        dynamics parameters of engram.v1.RetrieveOptions (0 = default).
      return_trace: return the energy after every step.
      partial_on_deadline: on a deadline, return partial states.
      clamp: boolean mask (N,) for every query or (B, N); True holds the
        coordinate at its query value.
      queue_timeout_ms: longest wait in the server's queue (0 = default).
    """
    req = pb.RetrieveRequest(bank=bank, queue_timeout_ms=operator.index(queue_timeout_ms))
    _append_floats(req, "queries", as_batch(queries, "queries"))
    cfg = energy_config(energy, beta, degree)
    if cfg is not None:
        req.energy.CopyFrom(cfg)
    req.options.CopyFrom(pb.RetrieveOptions(
        dynamics=enum_value("Dynamics", dynamics), max_steps=operator.index(max_steps),
        tol=float(tol), alpha=float(alpha), dt=float(dt), tau_v=float(tau_v),
        tau_h=float(tau_h), seed=operator.index(seed), return_trace=bool(return_trace),
        partial_on_deadline=bool(partial_on_deadline)))
    if clamp is not None:
        _append_bools(req, "clamp", clamp, "clamp")
    return req


def energy_request(bank: str, states: ArrayLike, *, gradient: bool = False,
                   energy: EnergyLike = None, beta: Optional[float] = None,
                   degree: Optional[int] = None,
                   queue_timeout_ms: int = 0) -> Tuple["pb.EnergyRequest", int]:
    """Returns (EnergyRequest, B) for a (B, N) or (N,) array of states."""
    batch = as_batch(states, "states")
    req = pb.EnergyRequest(bank=bank, return_gradient=bool(gradient),
                           queue_timeout_ms=operator.index(queue_timeout_ms))
    _append_floats(req, "states", batch)
    cfg = energy_config(energy, beta, degree)
    if cfg is not None:
        req.energy.CopyFrom(cfg)
    return req, batch.shape[0]


def sample_request(bank: str, count: int = 1, *, energy: EnergyLike = None,
                   beta: Optional[float] = None, degree: Optional[int] = None,
                   sampler: EnumLike = None, schedule: Union[EnumLike, "pb.Schedule"] = None,
                   sigma_max: Optional[float] = None, sigma_min: Optional[float] = None,
                   rho: Optional[float] = None, steps: Optional[int] = None,
                   stop_at_sigma_min: Optional[bool] = None, seed: int = 0,
                   query: Optional[ArrayLike] = None, sigma_start: float = 0.0,
                   clamp: Optional[ArrayLike] = None, churn: Optional[float] = None,
                   s_tmin: float = 0.0, s_tmax: Optional[float] = None,
                   s_noise: Optional[float] = None, langevin_steps: int = 0,
                   langevin_eta: Optional[float] = None, am_iterations: int = 0,
                   delta_memorized: Optional[float] = None,
                   delta_spurious: Optional[float] = None, trajectory_every: int = 0,
                   queue_timeout_ms: int = 0) -> "pb.SampleRequest":
    """Returns the SampleRequest for `count` samples.

    Args:
      energy, beta, degree: an energy override (see energy_config).
      sampler: "euler", "heun", "stochastic", "langevin", "annealed_am"
        (None: heun for continuous banks, annealed_am for bipolar ones).
      schedule: "karras", "geometric", "linear", or a pb.Schedule;
        sigma_max, sigma_min, rho, steps, stop_at_sigma_min set its fields
        (None keeps them; 0 is the server default).
      seed: random seed.
      query: (N,) or (count, N) start states (None: pure noise);
        sigma_start: the schedule starts there when a query is given.
      clamp: (N,) or (count, N) mask held at the query's values.
      churn, s_tmin, s_tmax, s_noise: stochastic sampler parameters.
      langevin_steps, langevin_eta: Langevin sampler parameters.
      am_iterations: AM updates per level of annealed_am.
      delta_memorized, delta_spurious: classification thresholds.
      trajectory_every: record every k-th state (0: none).
      queue_timeout_ms: longest wait in the server's queue (0 = default).
    """
    req = pb.SampleRequest(
        bank=bank, count=operator.index(count), sampler=enum_value("Sampler", sampler),
        seed=operator.index(seed), sigma_start=float(sigma_start), s_tmin=float(s_tmin),
        langevin_steps=operator.index(langevin_steps),
        am_iterations=operator.index(am_iterations),
        trajectory_every=operator.index(trajectory_every),
        queue_timeout_ms=operator.index(queue_timeout_ms))
    cfg = energy_config(energy, beta, degree)
    if cfg is not None:
        req.energy.CopyFrom(cfg)
    if isinstance(schedule, pb.Schedule):
        req.schedule.CopyFrom(schedule)
    else:
        req.schedule.kind = enum_value("ScheduleKind", schedule)
    for field, value in (("sigma_max", sigma_max), ("sigma_min", sigma_min), ("rho", rho)):
        if value is not None:
            setattr(req.schedule, field, float(value))
    if steps is not None:
        req.schedule.steps = operator.index(steps)
    if stop_at_sigma_min is not None:
        req.schedule.stop_at_sigma_min = bool(stop_at_sigma_min)
    if query is not None:
        _append_floats(req, "query", as_batch(query, "query"))
    if clamp is not None:
        _append_bools(req, "clamp", clamp, "clamp")
    for field, value in (("churn", churn), ("s_tmax", s_tmax), ("s_noise", s_noise),
                         ("langevin_eta", langevin_eta), ("delta_memorized", delta_memorized),
                         ("delta_spurious", delta_spurious)):
        if value is not None:
            setattr(req, field, float(value))
    return req


def backup_request(file: str) -> "pb.BackupRequest":
    """Returns the BackupRequest for a snapshot named `file`."""
    return pb.BackupRequest(file=file)


# ---------------------------------------------------------------------------
# Responses

def decode_bank_info(m: "pb.BankInfo") -> BankInfo:
    """Returns the BankInfo of a pb.BankInfo."""
    return BankInfo(
        name=m.name, dim=m.dim, kind=enum_name("StateKind", m.kind),
        energy=energy_spec(m.energy), precision=enum_name("Precision", m.precision),
        patterns=m.patterns, bytes=m.bytes, load=m.load,
        capacity=Capacity(patterns=m.capacity.patterns,
                          exact_patterns=m.capacity.exact_patterns,
                          formula=m.capacity.formula,
                          over_capacity=m.capacity.over_capacity),
        raw=m)


def decode_list_banks(m: "pb.ListBanksResponse") -> List[BankInfo]:
    """Returns the banks of a ListBanksResponse, in the server's (name) order."""
    return [decode_bank_info(b) for b in m.banks]


def decode_store(m: "pb.StoreResponse") -> np.ndarray:
    """Returns the stored ids as a uint64 array, in request order."""
    return np.array(list(m.ids), dtype=np.uint64)


def decode_patterns(m: "pb.GetPatternsResponse") -> Patterns:
    """Returns the Patterns of a GetPatternsResponse: (K, N) float32 rows."""
    k = len(m.ids)
    rows = _floats(m.patterns).reshape(k, m.dim) if m.dim else np.zeros((k, 0), np.float32)
    return Patterns(ids=np.array(list(m.ids), dtype=np.uint64), patterns=rows,
                    payloads=list(m.payloads), next_page_start=m.next_page_start, raw=m)


def decode_delete_patterns(m: "pb.DeletePatternsResponse") -> int:
    """Returns the number of patterns deleted."""
    return m.deleted


def decode_memory(parent: Any) -> Optional[Memory]:
    """Returns parent.nearest as a Memory, or None when it is unset."""
    if not parent.HasField("nearest"):
        return None
    n = parent.nearest
    return Memory(id=n.id, payload=n.payload, distance=n.distance, similarity=n.similarity)


def decode_retrieve(m: "pb.RetrieveResponse") -> List[RetrieveResult]:
    """Returns one RetrieveResult per query, in query order."""
    return [RetrieveResult(
        state=_floats(r.state), nearest=decode_memory(r), energy_start=r.energy_start,
        energy_end=r.energy_end, energy_trace=_floats(r.energy_trace, np.float64),
        steps=r.steps, converged=r.converged,
        stop_reason=enum_name("StopReason", r.stop_reason),
        lyapunov_violations=r.lyapunov_violations, raw=r) for r in m.results]


def decode_energy(m: "pb.EnergyResponse", batch: int) -> EnergyResult:
    """Returns (energies (B,), gradients (B, N) or None)."""
    gradients = None
    if len(m.gradients):
        gradients = _floats(m.gradients).reshape(batch, -1)
    return EnergyResult(energies=_floats(m.energies, np.float64), gradients=gradients)


def decode_sample(m: "pb.SampleResponse") -> SampleResponse:
    """Returns the SampleResponse of a pb.SampleResponse."""
    samples = [Sample(
        state=_floats(s.state), nearest=decode_memory(s), mirrored=s.mirrored,
        relative_distance=s.relative_distance,
        sample_class=enum_name("SampleClass", s.sample_class), fixed_point=s.fixed_point,
        spurious_fixed_point=s.spurious_fixed_point, energy=s.energy,
        trajectory=[TrajectoryPoint(step=t.step, sigma=t.sigma, state=_floats(t.state))
                    for t in s.trajectory],
        raw=s) for s in m.samples]
    return SampleResponse(samples=samples, sigmas=_floats(m.sigmas, np.float64), steps=m.steps,
                          raw=m)


def decode_frame(m: "pb.SampleFrame", count: int) -> SampleFrame:
    """Returns a SampleFrame with states shaped (count, N). The last frame
    carries its states only inside the result; they are copied up."""
    result = decode_sample(m.result) if m.HasField("result") else None
    if len(m.states):
        states = _floats(m.states).reshape(count, -1)
    elif result is not None and result.samples:
        states = np.stack([s.state for s in result.samples])
    else:
        states = np.zeros((0, 0), dtype=np.float32)
    return SampleFrame(step=m.step, sigma=m.sigma, states=states, result=result, raw=m)


def sample_count(req: "pb.SampleRequest") -> int:
    """Returns the number of samples a SampleRequest asks for (0 means 1)."""
    return req.count or 1


def decode_backup(m: "pb.BackupResponse") -> BackupResult:
    """Returns the BackupResult of a BackupResponse."""
    return BackupResult(path=m.path, bytes=m.bytes, banks=m.banks)
