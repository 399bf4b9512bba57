// Type declarations of engram-client (lib/*.js).
//
//   import { Client, EngramError } from 'engram-client';
//   const client = new Client('127.0.0.1:50051', { token: process.env.ENGRAM_TOKEN });
//   const bank = await client.createBank('demo', 3, { energy: { family: 'lse', beta: 4 } });
//   const ids: bigint[] = await client.store('demo', [[1, 0, 0], [0, 1, 0]]);
//   const [result] = await client.retrieve('demo', [0.9, 0.2, 0]);
//   client.close();

/// <reference types="node" />

import type { ChannelOptions, Interceptor, Metadata, status } from '@grpc/grpc-js';

/** A uint64 in a request: a bigint, a safe non-negative integer or a decimal string. */
export type Uint64 = bigint | number | string;

/**
 * A batch of B vectors of dimension N: B * N floats row-major (Float32Array,
 * Float64Array or number[]) or B rows of N.
 */
export type VectorBatch = Float32Array | Float64Array | readonly number[] | ReadonlyArray<ArrayLike<number>>;

/** A clamp mask: N or B * N flags, non-zero / true meaning "held". */
export type ClampMask = readonly boolean[] | readonly number[] | Uint8Array;

/** A payload: raw bytes, or a string stored as UTF-8. */
export type PayloadInput = Buffer | Uint8Array | string;

/** An int64 in a request: a bigint or a safe integer number. */
export type Int64 = bigint | number;

/**
 * The labels of one pattern as store() takes them: string values become
 * string labels, integers (int64) integer labels.
 */
export type LabelsInput = Readonly<Record<string, string | Int64>>;

/** The labels of one pattern as read back: integer labels as bigints. */
export type Labels = Record<string, string | bigint>;

/**
 * The test of one label in a {@link Filter}: a string (equal to), an integer
 * (equal to), a non-empty array of strings or of integers (any of), or an
 * inclusive integer range whose missing bound is open.
 */
export type LabelTest =
  | string
  | Int64
  | readonly string[]
  | readonly Int64[]
  | { readonly min: Int64; readonly max?: Int64 }
  | { readonly min?: Int64; readonly max: Int64 };

/**
 * Restricts retrieve, energy, sample and sampleStream to the patterns whose
 * labels pass every test (a pattern without the key fails), exactly as if the
 * bank held only those:
 *   { lang: 'en', year: { min: 2000, max: 2009 }, tag: ['a', 'b'], n: [1, 2], id: 7 }
 */
export type Filter = Readonly<Record<string, LabelTest>>;

/** One engram.v1.Condition as sent (see {@link toFilter}); int64 as decimal strings. */
export type FilterCondition = { key: string } & (
  | { equals: string }
  | { anyOf: { values: string[] } }
  | { intEquals: string }
  | { intAnyOf: { values: string[] } }
  | { intRange: { min: string; max: string } }
);

/** The engram.v1.Filter message of a {@link Filter}; also its proto3 JSON form. */
export interface FilterMessage {
  conditions: FilterCondition[];
}

/** Enum values are given as lowercase short names; proto names and numbers are accepted too. */
type EnumInput<Short extends string, Proto extends string> = Short | Uppercase<Short> | Proto | number;

export type StateKind = 'continuous' | 'bipolar';
export type Precision = 'f32' | 'bf16' | 'bit_packed' | 'f32_screened';
export type EnergyFamily = 'classical' | 'polynomial' | 'exponential' | 'lse' | 'gaussian' | 'general';
export type Similarity = 'dot' | 'neg_half_sq_l2' | 'neg_l1';
export type Separation = 'identity' | 'polynomial' | 'softmax' | 'max';
export type Dynamics = 'sync' | 'async' | 'gradient' | 'tinybrain';
export type StopReason = 'converged' | 'max_steps' | 'deadline' | 'diverged';
export type Sampler = 'euler' | 'heun' | 'stochastic' | 'langevin' | 'annealed_am';
export type ScheduleKind = 'karras' | 'geometric' | 'linear';
export type SampleClass = 'memorized' | 'spurious' | 'novel';

export type StateKindInput = EnumInput<StateKind, `STATE_KIND_${Uppercase<StateKind>}`>;
export type PrecisionInput = EnumInput<Precision, `PRECISION_${Uppercase<Precision>}`>;
export type EnergyFamilyInput = EnumInput<EnergyFamily, `ENERGY_FAMILY_${Uppercase<EnergyFamily>}`>;
export type SimilarityInput = EnumInput<Similarity, `SIMILARITY_${Uppercase<Similarity>}`>;
export type SeparationInput = EnumInput<Separation, `SEPARATION_${Uppercase<Separation>}`>;
export type DynamicsInput = EnumInput<Dynamics, `DYNAMICS_${Uppercase<Dynamics>}`>;
export type SamplerInput = EnumInput<Sampler, `SAMPLER_${Uppercase<Sampler>}`>;
export type ScheduleKindInput = EnumInput<ScheduleKind, `SCHEDULE_KIND_${Uppercase<ScheduleKind>}`>;

/** Names of the engram.v1 enums, as toProtoEnum / fromProtoEnum take them. */
export type EnumType =
  | 'StateKind' | 'Precision' | 'EnergyFamily' | 'Similarity' | 'Separation'
  | 'Dynamics' | 'StopReason' | 'Sampler' | 'ScheduleKind' | 'SampleClass';

/** An energy function (engram.v1.EnergyConfig); fields that do not apply to the family are ignored. */
export interface EnergyConfigInput {
  family?: EnergyFamilyInput;
  /** Degree of POLYNOMIAL (and GENERAL/POLYNOMIAL separation); 0 means 3. */
  degree?: number;
  /** POLYNOMIAL: max(s, 0)^n instead of s^n. */
  rectified?: boolean;
  /** Inverse temperature; 0 means 1. */
  beta?: number;
  similarity?: SimilarityInput;
  separation?: SeparationInput;
}

/** An energy as the server reports it, with defaults filled in. */
export interface EnergyConfig {
  family: EnergyFamily;
  degree: number;
  rectified: boolean;
  beta: number;
  similarity: Similarity;
  separation: Separation;
}

export interface Capacity {
  patterns: number;
  exactPatterns: number;
  formula: string;
  overCapacity: boolean;
}

export interface BankInfo {
  name: string;
  /** Dimension N. */
  dim: number;
  kind: StateKind;
  energy: EnergyConfig;
  precision: Precision;
  /** Stored patterns K. */
  patterns: number;
  /** Bytes of pattern data in memory. */
  bytes: number;
  /** K / N. */
  load: number;
  capacity: Capacity | null;
  /** Dimension M of each pattern's value; 0 for a bank without values. */
  valueDim: number;
  /** Default time to live of a stored pattern in seconds; 0: none. */
  ttlSeconds: number;
  /** Half-life of a pattern's weight in seconds; 0: no decay. */
  decayHalfLifeSeconds: number;
}

/** A stored memory. */
export interface Memory {
  id: bigint;
  payload: Buffer;
  /** Euclidean distance |x - xi|. */
  distance: number;
  /** Dot product xi . x. */
  similarity: number;
}

export interface CallOptions {
  /** Deadline of this call in ms (of each attempt); overrides the client's timeoutMs; 0 means none. */
  timeoutMs?: number;
}

export interface ClientOptions {
  /** Bearer token, sent as "authorization: Bearer <token>" on every call. */
  token?: string;
  /** Connect with TLS (implied by rootCerts). */
  tls?: boolean;
  /** PEM roots verifying the server certificate; the system roots when omitted. */
  rootCerts?: Buffer | string;
  /** Deadline of each attempt in ms (default 30000; 0: none). */
  timeoutMs?: number;
  /** Retries after an attempt answered UNAVAILABLE (default 3): at most retries + 1 attempts. */
  retries?: number;
  /** Backoff base in ms (default 100): retry r waits U[d/2, d], d = min(maxBackoffMs, backoffMs * 2^(r-1)). */
  backoffMs?: number;
  /** Backoff ceiling in ms (default 5000). */
  maxBackoffMs?: number;
  /** Extra @grpc/grpc-js channel options. */
  channelOptions?: Partial<ChannelOptions>;
  /** @grpc/grpc-js client interceptors, run on every attempt. */
  interceptors?: Interceptor[];
}

export interface CreateBankOptions extends CallOptions {
  /** Default "continuous". */
  kind?: StateKindInput;
  /** Default energy, or a family name; family defaults to lse (continuous) / classical (bipolar). */
  energy?: EnergyConfigInput | EnergyFamilyInput;
  precision?: PrecisionInput;
  /** Dimension M of the value each pattern carries (a key -> value bank); default 0, none. */
  valueDim?: number;
  /** Default time to live of the bank's patterns in seconds; default 0, none. */
  ttlSeconds?: Uint64;
  /** Half-life of a pattern's weight in seconds (softmax energies, continuous banks); default 0, no decay. */
  decayHalfLifeSeconds?: Uint64;
}

export interface StoreOptions extends CallOptions {
  /** The bank's dimension, checked against the batch before sending. */
  dim?: number;
  /** One uint64 id per pattern; the server assigns ids when omitted. */
  ids?: readonly Uint64[];
  /** One payload per pattern, each at most 64 KiB. */
  payloads?: readonly PayloadInput[];
  /** K * M floats or K rows of M: required on a bank with valueDim M > 0, refused on others. */
  values?: VectorBatch;
  /** The bank's valueDim, checked against the values before sending. */
  valueDim?: number;
  /** One labels object per pattern (null: none); other value types throw TypeError. */
  labels?: ReadonlyArray<LabelsInput | null | undefined>;
  /** Time to live of these patterns in seconds; 0 or omitted: the bank's ttlSeconds. */
  ttlSeconds?: Uint64;
}

export interface GetPatternsOptions extends CallOptions {
  /** Ids to read; when empty, one page of the bank in storage order. */
  ids?: readonly Uint64[];
  pageStart?: number | bigint;
  /** Rows per page; 0 means 1000. */
  pageSize?: number;
}

export interface Patterns {
  dim: number;
  ids: bigint[];
  /** ids.length * dim floats, bit for bit as stored. */
  patterns: Float32Array;
  payloads: Buffer[];
  /** ids.length * valueDim floats, bit for bit as stored; empty for a bank without values. */
  values: Float32Array;
  /** One per id. */
  labels: Labels[];
  /** Unix time in ms at which each pattern expires; 0: never. Expired patterns stay here until the server's sweep. */
  expiresUnixMs: number[];
  /** Unix time in ms at which each pattern was stored (its age for decay); 0: not recorded. */
  storedUnixMs: number[];
  /** Row to ask for next; the bank size after the last page. */
  nextPageStart: number;
}

export interface DeletePatternsResult {
  deleted: number;
  bankPatterns: number;
}

export interface RetrieveOptions extends CallOptions {
  dim?: number;
  /** Overrides the bank's energy. */
  energy?: EnergyConfigInput | EnergyFamilyInput;
  /** Default "sync". */
  dynamics?: DynamicsInput;
  /** 0 means 100. */
  maxSteps?: number;
  /** |dx|_inf convergence threshold; 0 means 1e-6. */
  tol?: number;
  alpha?: number;
  dt?: number;
  tauV?: number;
  tauH?: number;
  seed?: Uint64;
  returnTrace?: boolean;
  partialOnDeadline?: boolean;
  clamp?: ClampMask;
  queueTimeoutMs?: number;
  /** Recall among the passing patterns only; rejects FAILED_PRECONDITION when none passes. */
  filter?: Filter;
}

export interface RetrieveResult {
  /** Final state, N floats. */
  state: Float32Array;
  /** Nearest stored memory to the final state; null for an empty bank. */
  nearest: Memory | null;
  energyStart: number;
  energyEnd: number;
  /** Energies after each step when returnTrace was set (first entry: start). */
  energyTrace: number[];
  steps: number;
  converged: boolean;
  stopReason: StopReason | 'unspecified';
  lyapunovViolations: number;
  /** Banks with values: the M floats of the readout sum_mu p_mu v_mu at the final state; else null. */
  value: Float32Array | null;
}

export interface EnergyOptions extends CallOptions {
  dim?: number;
  /** Also return grad E. */
  gradient?: boolean;
  energy?: EnergyConfigInput | EnergyFamilyInput;
  queueTimeoutMs?: number;
  /** The energy of the passing patterns only. */
  filter?: Filter;
  /** Also return each state's novelty relative to the bank's own memories (novelty, noveltyZ). */
  novelty?: boolean;
}

export interface EnergyResult {
  /** One energy (double) per state. */
  energies: number[];
  /** B * N floats when gradient was requested, else null. */
  gradients: Float32Array | null;
  /** Banks with values: B * M floats row-major, the readout at each state (one attention step); else null. */
  values: Float32Array | null;
  /**
   * With `novelty: true`, one double per state: the fraction of the stored patterns' own energies
   * below the state's energy (equal ones counting half), over min(K, 256) stored patterns (those
   * whose ids hash smallest, so the same on a node and through a router) under the same energy
   * and filter. Stored patterns sit at
   * minima: a state like them scores mid-range, one far from every memory near 1. Else null.
   */
  novelty: Float64Array | null;
  /** With `novelty: true`, one double per state: (E(x) - mean) / population standard deviation of those stored energies (0 when all are equal); else null. */
  noveltyZ: Float64Array | null;
}

export interface ScheduleInput {
  kind?: ScheduleKindInput;
  /** 0 means 80. */
  sigmaMax?: number;
  /** 0 means 0.002. */
  sigmaMin?: number;
  /** 0 means 7. */
  rho?: number;
  /** Noise levels; 0 means 64. */
  steps?: number;
  stopAtSigmaMin?: boolean;
}

export interface SampleOptions extends CallOptions {
  dim?: number;
  /** Samples; 0 means 1. */
  count?: number;
  energy?: EnergyConfigInput | EnergyFamilyInput;
  sampler?: SamplerInput;
  schedule?: ScheduleInput;
  seed?: Uint64;
  /** N or count * N floats to start from (plus noise of sigmaStart). */
  query?: VectorBatch;
  sigmaStart?: number;
  clamp?: ClampMask;
  churn?: number;
  sTmin?: number;
  sTmax?: number;
  sNoise?: number;
  langevinSteps?: number;
  langevinEta?: number;
  amIterations?: number;
  deltaMemorized?: number;
  deltaSpurious?: number;
  /** Record every k-th state in each sample's trajectory (0: none). */
  trajectoryEvery?: number;
  queueTimeoutMs?: number;
  /** Sample from the passing memories only; rejects FAILED_PRECONDITION when none passes. */
  filter?: Filter;
}

export interface TrajectoryPoint {
  step: number;
  sigma: number;
  state: Float32Array;
}

export interface SampleResult {
  state: Float32Array;
  nearest: Memory | null;
  mirrored: boolean;
  relativeDistance: number;
  sampleClass: SampleClass | 'unspecified';
  fixedPoint: boolean;
  spuriousFixedPoint: boolean;
  energy: number;
  trajectory: TrajectoryPoint[];
}

export interface SampleResponse {
  samples: SampleResult[];
  /** The noise levels used. */
  sigmas: number[];
  steps: number;
}

export interface SampleFrame {
  /** Steps taken so far. */
  step: number;
  /** Noise level reached. */
  sigma: number;
  /** count * N floats: every sample's current state. */
  states: Float32Array;
  /** The whole response, on the last frame only. */
  result: SampleResponse | null;
}

/** Frames of sampleStream; breaking out of `for await` cancels the call. */
export interface SampleStream extends AsyncGenerator<SampleFrame, void, undefined> {
  /** Cancels the call; the iteration then ends without an error. */
  cancel(): void;
}

export interface BackupResult {
  /** Where the snapshot was written, on the server. */
  path: string;
  bytes: number;
  banks: number;
}

/** A failed call: every promise of the client rejects with one. */
export class EngramError extends Error {
  constructor(code: number, details: string, extra?: {
    method?: string; attempts?: number; metadata?: Metadata; cause?: unknown;
  });
  readonly name: 'EngramError';
  /** gRPC status code, e.g. 5. */
  readonly code: status | number;
  /** Its name, e.g. "NOT_FOUND". */
  readonly codeName: string;
  /** The server's message verbatim (the client's for arguments it rejects itself). */
  readonly details: string;
  /** The RPC, e.g. "Retrieve"; undefined for arguments rejected before any call. */
  readonly method: string | undefined;
  /** Calls made, retries included; 0 when nothing was sent. */
  readonly attempts: number;
  /** Trailing metadata of the failed call. */
  readonly metadata: Metadata | undefined;
  /** Wraps an error of @grpc/grpc-js. */
  static fromGrpc(err: unknown, method: string, attempts: number): EngramError;
}

/**
 * A client of one engramd (one gRPC channel); safe to share between
 * concurrent calls. Retries calls answered UNAVAILABLE only.
 */
export class Client {
  /**
   * @param target host:port of engramd, default "127.0.0.1:50051"
   */
  constructor(target?: string, options?: ClientOptions);
  readonly target: string;
  /** Closes the channel; later calls reject with CANCELLED. */
  close(): void;

  /** Creates an empty bank. Rejects ALREADY_EXISTS, INVALID_ARGUMENT, FAILED_PRECONDITION. */
  createBank(name: string, dim: number, options?: CreateBankOptions): Promise<BankInfo>;
  /** Describes one bank. Rejects NOT_FOUND. */
  getBank(name: string, options?: CallOptions): Promise<BankInfo>;
  /** Every bank, ordered by name. */
  listBanks(options?: CallOptions): Promise<BankInfo[]>;
  /** Deletes a bank and its patterns. Rejects NOT_FOUND. */
  deleteBank(name: string, options?: CallOptions): Promise<void>;

  /** Stores patterns atomically; resolves to their ids in order. */
  store(bank: string, patterns: VectorBatch, options?: StoreOptions): Promise<bigint[]>;
  /** Reads patterns back by id, or one page of the bank. */
  getPatterns(bank: string, options?: GetPatternsOptions): Promise<Patterns>;
  /** Deletes patterns by id, atomically. Rejects NOT_FOUND if any is absent. */
  deletePatterns(bank: string, ids: readonly Uint64[], options?: CallOptions): Promise<DeletePatternsResult>;

  /** Content-addressable recall from each query; one result per query. */
  retrieve(bank: string, queries: VectorBatch, options?: RetrieveOptions): Promise<RetrieveResult[]>;
  /** Energy (and gradient) at each state. */
  energy(bank: string, states: VectorBatch, options?: EnergyOptions): Promise<EnergyResult>;
  /** Diffusion-style sampling with the bank's energy as score. */
  sample(bank: string, options?: SampleOptions): Promise<SampleResponse>;
  /** The same, streaming every state as it forms; the last frame carries the result. */
  sampleStream(bank: string, options?: SampleOptions): SampleStream;

  /** Writes a snapshot of every bank to <data_dir>/backups/<file> on the server. */
  backup(file: string, options?: CallOptions): Promise<BackupResult>;
}

/** The client's defaults. */
export const DEFAULTS: {
  readonly timeoutMs: number;
  readonly retries: number;
  readonly backoffMs: number;
  readonly maxBackoffMs: number;
};

/** gRPC status codes (status.NOT_FOUND === 5). */
export { status } from '@grpc/grpc-js';

/** The proto name of an enum value: toProtoEnum('StopReason', 'converged') === 'STOP_REASON_CONVERGED'. */
export function toProtoEnum(type: EnumType, value: string | number): string | number;
/** The short name of a proto enum value: fromProtoEnum('SampleClass', 'SAMPLE_CLASS_NOVEL') === 'novel'. */
export function fromProtoEnum(type: EnumType, value: string | number): string | number;
/**
 * The engram.v1.Filter message of a filter object, as the client sends it:
 * toFilter({ lang: 'en' }) deep-equals { conditions: [{ key: 'lang', equals: 'en' }] }.
 * Throws TypeError for a test of no accepted form, RangeError for an integer outside int64.
 */
export function toFilter(filter: Filter): FilterMessage;
/** The directory engram/v1/engram.proto is loaded from. */
export function protoDir(): string;
