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
  * Labels: a dict per pattern; str values are string labels, int values
    (not bool) integer labels.
  * Filters: a dict {key: test} (see label_filter) or a pb.Filter.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._gen.engram.v1 import engram_pb2 as pb
from .types import (BackupResult, BankInfo, Capacity, EnergyResult, EnergySpec, Memory,
                    Patterns, Range, RetrieveResult, Sample, SampleFrame, SampleResponse,
                    TrajectoryPoint)

EnumLike = Union[str, int, None]
EnergyLike = Union[str, int, EnergySpec, "pb.EnergyConfig", None]
ArrayLike = Any
LabelValue = Union[str, int]
LabelsLike = Union[Mapping[str, LabelValue], "pb.Labels", None]


FilterTest = Union[str, int, Range, range, Iterable[str], Iterable[int]]
FilterLike = Union[Mapping[str, FilterTest], "pb.Filter", None]

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


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


# ---------------------------------------------------------------------------
# Labels and filters

def labels_message(labels: LabelsLike) -> "pb.Labels":
    """Returns the pb.Labels of one pattern's labels.

    `labels` is a dict {key: value}: str values become string labels, int
    values (Python or numpy ints, not bool) integer labels; None means no
    labels; a pb.Labels is copied. Raises TypeError for any other key or
    value type.
    """
    out = pb.Labels()
    if labels is None:
        return out
    if isinstance(labels, pb.Labels):
        out.CopyFrom(labels)
        return out
    if not isinstance(labels, Mapping):
        raise TypeError("labels must be a dict {str: str | int}, not %r" % (labels,))
    for key, value in labels.items():
        if not isinstance(key, str):
            raise TypeError("label keys must be str, not %r" % (key,))
        if isinstance(value, str):
            out.strings[key] = value
        elif _is_int(value):
            out.ints[key] = int(value)
        else:
            raise TypeError("label %r must be a str or an int, not %r" % (key, value))
    return out


def labels_dict(m: "pb.Labels") -> Dict[str, LabelValue]:
    """Returns a pb.Labels as one dict: string labels as str, integer ones as int."""
    out: Dict[str, LabelValue] = dict(m.strings)
    out.update(m.ints)
    return out


def _condition(key: str, test: Any) -> "pb.Condition":
    if not isinstance(key, str):
        raise TypeError("filter keys must be str, not %r" % (key,))
    c = pb.Condition(key=key)
    if isinstance(test, str):
        c.equals = test
    elif _is_int(test):
        c.int_equals = int(test)
    elif isinstance(test, Range):
        c.int_range.min, c.int_range.max = operator.index(test.min), operator.index(test.max)
    elif isinstance(test, range):
        if test.step != 1:
            raise ValueError("filter %r: only ranges of step 1 are supported, got %r"
                             % (key, test))
        c.int_range.min, c.int_range.max = test.start, test.stop - 1
    elif isinstance(test, (list, tuple, set, frozenset, np.ndarray)):
        values = list(test.tolist() if isinstance(test, np.ndarray) else test)
        if all(isinstance(v, str) for v in values):
            c.any_of.SetInParent()   # an empty list is sent, and refused by the server
            c.any_of.values.extend(values)
        elif all(_is_int(v) for v in values):
            c.int_any_of.values.extend(int(v) for v in values)
        else:
            raise TypeError("filter %r: a list must hold only str or only int values, got %r"
                            % (key, values))
    else:
        raise TypeError("filter %r: expected str, int, Range, range or a list of str or of "
                        "int, not %r" % (key, test))
    return c


def label_filter(spec: FilterLike) -> Optional["pb.Filter"]:
    """Returns the pb.Filter of a friendly filter, or None for None.

    `spec` is a pb.Filter (copied) or a dict {key: test}, every test to pass
    (AND), a pattern without the key failing it:
      "en"                   string label equal to "en"          (equals)
      ["en", "de"]           string label in the list (any list, tuple or set)  (any_of)
      7                      integer label equal to 7            (int_equals)
      [1, 2, 3]              integer label in the list           (int_any_of)
      Range(2000, 2009)      integer label in [2000, 2009]       (int_range)
      range(2000, 2010)      the same (step 1 only)
    (a tuple is a list of values, not an interval: use Range for that).
    Raises TypeError for other types (bool included) and ValueError for a
    range of step != 1. Empty lists, empty keys and min > max are encoded as
    given; the server answers them InvalidArgument.
    """
    if spec is None:
        return None
    out = pb.Filter()
    if isinstance(spec, pb.Filter):
        out.CopyFrom(spec)
        return out
    if not isinstance(spec, Mapping):
        raise TypeError("filter must be a dict {key: test} or a pb.Filter, not %r" % (spec,))
    out.conditions.extend(_condition(k, v) for k, v in spec.items())
    return out


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

def _set_filter(req: Any, spec: FilterLike) -> None:
    f = label_filter(spec)
    if f is not None:
        req.filter.CopyFrom(f)


def create_bank_request(name: str, dim: int, kind: EnumLike = "continuous", *,
                        energy: EnergyLike = None, beta: Optional[float] = None,
                        degree: Optional[int] = None, precision: EnumLike = None,
                        value_dim: int = 0, ttl_seconds: int = 0,
                        decay_half_life_seconds: int = 0) -> "pb.CreateBankRequest":
    """Returns the CreateBankRequest for a bank `name` of dimension `dim`
    (value_dim M > 0: a key -> value bank; ttl_seconds: default time to live;
    decay_half_life_seconds: half-life of a pattern's weight, 0: none)."""
    req = pb.CreateBankRequest(name=name, dim=operator.index(dim),
                               kind=enum_value("StateKind", kind),
                               precision=enum_value("Precision", precision),
                               value_dim=operator.index(value_dim),
                               ttl_seconds=operator.index(ttl_seconds),
                               decay_half_life_seconds=operator.index(decay_half_life_seconds))
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
                  payloads: Optional[Iterable[Union[bytes, str]]] = None,
                  values: Optional[ArrayLike] = None,
                  labels: Optional[Iterable[LabelsLike]] = None,
                  ttl_seconds: int = 0) -> "pb.StoreRequest":
    """Returns the StoreRequest for a (K, N) or (N,) array of patterns.

    `ids` (one per pattern, or None for server-assigned ids), `payloads`
    (bytes, or str stored as UTF-8) and `labels` (one dict per pattern, see
    labels_message) are passed through; the server checks their counts.
    `values` is a (K, M) array (a (M,) vector when K is 1), one value per
    pattern, for a bank with value_dim M; ValueError if it has not K rows.
    `ttl_seconds` 0 means the bank's default time to live.
    """
    req = pb.StoreRequest(bank=bank, ttl_seconds=operator.index(ttl_seconds))
    batch = as_batch(patterns, "patterns")
    _append_floats(req, "patterns", batch)
    if values is not None:
        v = as_batch(values, "values")
        if v.shape[0] != batch.shape[0]:
            raise ValueError("values has %d rows for %d patterns; pass a (K, M) array"
                             % (v.shape[0], batch.shape[0]))
        _append_floats(req, "values", v)
    if labels is not None:
        req.labels.extend(labels_message(item) for item in labels)
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
                     queue_timeout_ms: int = 0,
                     filter: FilterLike = None) -> "pb.RetrieveRequest":
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
      filter: recall only among the patterns whose labels pass (see
        label_filter); FailedPrecondition when none does.
    """
    req = pb.RetrieveRequest(bank=bank, queue_timeout_ms=operator.index(queue_timeout_ms))
    _set_filter(req, filter)
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
                   degree: Optional[int] = None, queue_timeout_ms: int = 0,
                   filter: FilterLike = None,
                   novelty: bool = False) -> Tuple["pb.EnergyRequest", int]:
    """Returns (EnergyRequest, B) for a (B, N) or (N,) array of states;
    `filter` (see label_filter) keeps only the patterns that pass, `novelty`
    sets return_novelty."""
    batch = as_batch(states, "states")
    req = pb.EnergyRequest(bank=bank, return_gradient=bool(gradient),
                           queue_timeout_ms=operator.index(queue_timeout_ms),
                           return_novelty=bool(novelty))
    _set_filter(req, filter)
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
                   queue_timeout_ms: int = 0,
                   filter: FilterLike = None) -> "pb.SampleRequest":
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
      filter: sample from the memories whose labels pass only (see
        label_filter); FailedPrecondition when none does.
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
    _set_filter(req, filter)
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
        value_dim=m.value_dim, ttl_seconds=m.ttl_seconds,
        decay_half_life_seconds=m.decay_half_life_seconds, raw=m)


def decode_list_banks(m: "pb.ListBanksResponse") -> List[BankInfo]:
    """Returns the banks of a ListBanksResponse, in the server's (name) order."""
    return [decode_bank_info(b) for b in m.banks]


def decode_store(m: "pb.StoreResponse") -> np.ndarray:
    """Returns the stored ids as a uint64 array, in request order."""
    return np.array(list(m.ids), dtype=np.uint64)


def _rows(values: Sequence[float], rows: int) -> Optional[np.ndarray]:
    """Returns packed floats as a (rows, M) float32 array, None when empty."""
    return _floats(values).reshape(rows, -1) if len(values) else None


def decode_patterns(m: "pb.GetPatternsResponse") -> Patterns:
    """Returns the Patterns of a GetPatternsResponse: (K, N) float32 rows."""
    k = len(m.ids)
    rows = _floats(m.patterns).reshape(k, m.dim) if m.dim else np.zeros((k, 0), np.float32)
    return Patterns(ids=np.array(list(m.ids), dtype=np.uint64), patterns=rows,
                    payloads=list(m.payloads), next_page_start=m.next_page_start,
                    values=_rows(m.values, k), labels=[labels_dict(x) for x in m.labels],
                    expires_unix_ms=np.array(list(m.expires_unix_ms), dtype=np.int64),
                    stored_unix_ms=np.array(list(m.stored_unix_ms), dtype=np.int64), raw=m)


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
        lyapunov_violations=r.lyapunov_violations,
        value=_floats(r.value) if len(r.value) else None, raw=r) for r in m.results]


def _doubles(values: Sequence[float]) -> Optional[np.ndarray]:
    """Returns packed doubles as a float64 array, None when empty."""
    return _floats(values, np.float64) if len(values) else None


def decode_energy(m: "pb.EnergyResponse", batch: int) -> EnergyResult:
    """Returns (energies (B,), gradients (B, N) or None), with .values (B, M),
    .novelty (B,) and .novelty_z (B,), each None when the response has none."""
    return EnergyResult(_floats(m.energies, np.float64), _rows(m.gradients, batch),
                        _rows(m.values, batch), _doubles(m.novelty), _doubles(m.novelty_z))


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
