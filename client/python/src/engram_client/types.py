"""Plain result types returned by Client and AsyncClient, and the
EnergySpec and Range arguments they take.

Vectors are numpy arrays (states float32, energies float64, ids uint64);
enum values are lowercase names without their prefix ("bipolar", "lse",
"converged", "memorized"). BankInfo, Patterns, RetrieveResult, Sample,
SampleResponse and SampleFrame keep the protobuf message they were decoded
from in `raw`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, NamedTuple, Optional, Union

import numpy as np

__all__ = [
    "EnergySpec", "Range", "Capacity", "BankInfo", "Patterns", "Memory", "RetrieveResult",
    "EnergyResult", "TrajectoryPoint", "Sample", "SampleResponse", "SampleFrame",
    "BackupResult",
]


@dataclasses.dataclass(frozen=True)
class EnergySpec:
    """An energy function (engram.v1.EnergyConfig) with friendly enum names.

    Accepted wherever an `energy=` argument is. Zero / "unspecified" fields
    take the server's defaults (see engram.proto).

    Attributes:
      family: "classical", "polynomial", "exponential", "lse", "gaussian",
        "general" (or a pb.EnergyFamily value).
      beta: inverse temperature of exponential, lse, gaussian and
        general/softmax; 0 means 1.
      degree: degree n of polynomial (and general/polynomial); 0 means 3.
      rectified: polynomial uses max(s, 0)^n.
      similarity: general only: "dot", "neg_half_sq_l2", "neg_l1".
      separation: general only: "identity", "polynomial", "softmax", "max".
    """

    family: Union[str, int] = "unspecified"
    beta: float = 0.0
    degree: int = 0
    rectified: bool = False
    similarity: Union[str, int] = "unspecified"
    separation: Union[str, int] = "unspecified"


class Range(NamedTuple):
    """Integer label test of a filter: min <= label <= max, both inclusive.

    `{"year": Range(2000, 2009)}`; a Python `range(2000, 2010)` (step 1)
    means the same.
    """

    min: int
    max: int


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Theoretical capacity of a bank's default energy at its dimension."""

    patterns: float         # patterns retrievable with small error
    exact_patterns: float   # patterns that are all exact fixed points
    formula: str            # human-readable formula
    over_capacity: bool     # the bank holds more than `patterns`


@dataclasses.dataclass(frozen=True)
class BankInfo:
    """Description of one bank (engram.v1.BankInfo)."""

    name: str
    dim: int                # N
    kind: str               # "continuous" or "bipolar"
    energy: EnergySpec      # default energy, server defaults filled in
    precision: str          # "f32", "bf16", "bit_packed", "f32_screened"
    patterns: int           # stored patterns K
    bytes: int              # bytes of pattern data in memory
    load: float             # K / N
    capacity: Capacity
    value_dim: int          # M of a key -> value bank; 0: no values
    ttl_seconds: int        # default time to live of stored patterns; 0: none
    decay_half_life_seconds: int  # half-life of a pattern's weight; 0: no decay
    raw: Any = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Patterns:
    """Stored patterns read back by get_patterns.

    Attributes:
      ids: uint64 array (K,).
      patterns: float32 array (K, N), bit for bit as stored.
      payloads: K payloads.
      next_page_start: row to ask for next; the bank size after the last page.
      values: float32 array (K, M), bit for bit as stored, for a bank with
        values; None for a bank without values (or no patterns).
      labels: K dicts {key: str | int}, as stored ({} without labels).
      expires_unix_ms: int64 array (K,), Unix time in ms at which each
        pattern expires; 0: never.
      stored_unix_ms: int64 array (K,), Unix time in ms at which each
        pattern was stored (its age for decay); 0: not recorded.
    """

    ids: np.ndarray
    patterns: np.ndarray
    payloads: List[bytes]
    next_page_start: int
    values: Optional[np.ndarray]
    labels: List[Dict[str, Union[str, int]]]
    expires_unix_ms: np.ndarray
    stored_unix_ms: np.ndarray
    raw: Any = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class Memory:
    """A stored pattern nearest to a state."""

    id: int             # the stored pattern's id
    payload: bytes      # its payload as stored
    distance: float     # |x - xi|
    similarity: float   # xi . x


@dataclasses.dataclass(frozen=True, eq=False)
class RetrieveResult:
    """Outcome of one query of retrieve.

    Attributes:
      state: float32 array (N,), the final state.
      nearest: nearest stored memory to the state (None for an empty bank).
      energy_start, energy_end: energies of the query and of the state.
      energy_trace: float64 array of the energy after each step (first entry:
        start) when return_trace=True, else empty.
      steps: steps taken (sweeps for async dynamics).
      converged: stop_reason == "converged".
      stop_reason: "converged", "max_steps", "deadline" or "diverged".
      lyapunov_violations: energy rises seen under a descent guarantee.
      value: float32 array (M,), the readout sum_mu p_mu v_mu at the final
        state for a bank with values (p: the energy's separation weights,
        softmax(beta xi_mu . x) for lse); None for a bank without values.
    """

    state: np.ndarray
    nearest: Optional[Memory]
    energy_start: float
    energy_end: float
    energy_trace: np.ndarray
    steps: int
    converged: bool
    stop_reason: str
    lyapunov_violations: int
    value: Optional[np.ndarray]
    raw: Any = dataclasses.field(default=None, repr=False)


class _EnergyPair(NamedTuple):
    energies: np.ndarray
    gradients: Optional[np.ndarray]


class EnergyResult(_EnergyPair):
    """Energies of a batch of states: `energies, gradients = client.energy(...)`.

    A pair: energies, float64 array (B,); gradients, float32 array (B, N)
    when asked for, else None. Outside the pair (so that two-name unpacking
    keeps working):
      values: float32 array (B, M) of the readout at each state for a bank
        with values (one attention step, softmax(beta Xi x) V for lse),
        else None.
      novelty: float64 array (B,) when asked for (`novelty=True`), else
        None: the fraction of the stored patterns' own energies below each
        state's energy, equal ones counting half, over min(K, 256) stored
        patterns (those whose ids hash smallest, so the same on a node and
        through a router) under the same energy and filter. Stored patterns sit at minima: a state like them
        scores mid-range, one far from every memory near 1.
      novelty_z: float64 array (B,) alongside `novelty`, else None:
        (E(x) - mean) / population standard deviation of those stored
        energies (0 when they are all equal).
    """

    values: Optional[np.ndarray] = None
    novelty: Optional[np.ndarray] = None
    novelty_z: Optional[np.ndarray] = None

    def __new__(cls, energies: np.ndarray, gradients: Optional[np.ndarray] = None,
                values: Optional[np.ndarray] = None, novelty: Optional[np.ndarray] = None,
                novelty_z: Optional[np.ndarray] = None) -> "EnergyResult":
        self = super().__new__(cls, energies, gradients)
        self.values = values
        self.novelty = novelty
        self.novelty_z = novelty_z
        return self

    def __getnewargs__(self) -> tuple:
        return (self.energies, self.gradients, self.values, self.novelty, self.novelty_z)

    def __repr__(self) -> str:
        return ("EnergyResult(energies=%r, gradients=%r, values=%r, novelty=%r, novelty_z=%r)"
                % (self.energies, self.gradients, self.values, self.novelty, self.novelty_z))


@dataclasses.dataclass(frozen=True, eq=False)
class TrajectoryPoint:
    """A recorded state of one sample."""

    step: int           # index in the recorded trajectory
    sigma: float        # noise level of this state
    state: np.ndarray   # float32 (N,)


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One sample of sample / sample_stream.

    Attributes:
      state: float32 array (N,).
      nearest: nearest stored memory (None for an empty bank).
      mirrored: the sample matched -xi (energies even in x).
      relative_distance: |x - xi_nearest| / |xi_nearest|.
      sample_class: "memorized", "spurious" or "novel".
      fixed_point, spurious_fixed_point: see engram.v1.SampleResult.
      energy: energy at the final state (beta = 1/sigma_last^2).
      trajectory: recorded states when trajectory_every > 0.
    """

    state: np.ndarray
    nearest: Optional[Memory]
    mirrored: bool
    relative_distance: float
    sample_class: str
    fixed_point: bool
    spurious_fixed_point: bool
    energy: float
    trajectory: List[TrajectoryPoint]
    raw: Any = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True, eq=False)
class SampleResponse:
    """Result of sample: the samples, the noise levels used, the steps taken."""

    samples: List[Sample]
    sigmas: np.ndarray   # float64
    steps: int
    raw: Any = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True, eq=False)
class SampleFrame:
    """One frame of sample_stream.

    Attributes:
      step: steps taken so far.
      sigma: noise level reached.
      states: float32 array (count, N), every sample's current state (on
        the last frame: the final samples, as in result).
      result: the whole SampleResponse on the last frame, None before it.
    """

    step: int
    sigma: float
    states: np.ndarray
    result: Optional[SampleResponse]
    raw: Any = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class BackupResult:
    """Where a backup was written on the server, its size and bank count."""

    path: str
    bytes: int
    banks: int
