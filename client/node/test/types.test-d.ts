// Type-checked by `npm run typecheck` (tsc --noEmit), never run: uses the
// declared API the way a TypeScript program would, and asserts that wrong
// uses do not compile.
import {
  BankInfo, Client, EngramError, EnergyResult, Filter, FilterMessage, Labels, RetrieveResult, SampleFrame,
  SampleResponse, fromProtoEnum, status, toFilter, toProtoEnum,
} from 'engram-client';

type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends (<T>() => T extends B ? 1 : 2) ? true : false;
function assertType<T extends true>(): T | undefined { return undefined; }

export async function usage(): Promise<number> {
  const client = new Client('127.0.0.1:50051', {
    token: 's3cret', timeoutMs: 5000, retries: 2, backoffMs: 50,
    channelOptions: { 'grpc.keepalive_time_ms': 10000 },
  });
  const secure = new Client('engram.example:443', { tls: true, rootCerts: Buffer.from('pem') });
  secure.close();
  new Client();

  const bank: BankInfo = await client.createBank('demo', 4, {
    kind: 'continuous', energy: { family: 'lse', beta: 4 }, precision: 'f32',
  });
  await client.createBank('spins', 64, { kind: 'STATE_KIND_BIPOLAR', energy: 'polynomial' });
  await client.createBank('general', 8, {
    energy: { family: 'general', similarity: 'neg_half_sq_l2', separation: 'SEPARATION_SOFTMAX', beta: 2 },
  });
  assertType<Equal<typeof bank.kind, 'continuous' | 'bipolar'>>();
  const kv: BankInfo = await client.createBank('kv', 4, { valueDim: 2, ttlSeconds: 3600 });
  const valueDim: number = kv.valueDim;
  const ttl: number = kv.ttlSeconds;
  await client.createBank('kv2', 4, { ttlSeconds: 10n });
  const banks: BankInfo[] = await client.listBanks();
  const names: string[] = banks.map((b) => b.name);

  const ids: bigint[] = await client.store('demo', [[1, 0, 0, 0], [0, 1, 0, 0]], {
    dim: 4, ids: [2n ** 53n + 1n, '18446744073709551615'], payloads: [Buffer.from('a'), 'b'],
  });
  await client.store('demo', new Float32Array(8));
  await client.store('kv', [[1, 0, 0, 0], [0, 1, 0, 0]], {
    values: new Float32Array(4), valueDim: 2, labels: [{ lang: 'en', year: 2001, big: 2n ** 62n }, null], ttlSeconds: 60,
  });
  await client.store('kv', [[1, 0, 0, 0]], { values: [new Float32Array(2)], labels: [{}] });
  const kvBack = await client.getPatterns('kv');
  const values: Float32Array = kvBack.values;
  const labels: Labels = kvBack.labels[0];
  const label: string | bigint | undefined = labels.year;
  const expires: number[] = kvBack.expiresUnixMs;
  const back = await client.getPatterns('demo', { ids });
  const first: bigint = back.ids[0];
  const floats: Float32Array = back.patterns;
  const payload: Buffer = back.payloads[0];
  const page = await client.getPatterns('demo', { pageStart: 0, pageSize: 100 });
  const removed: number = (await client.deletePatterns('demo', [first])).deleted;

  const results: RetrieveResult[] = await client.retrieve('demo', new Float32Array(4), {
    dynamics: 'sync', maxSteps: 50, tol: 1e-6, returnTrace: true, clamp: [true, false, false, false],
  });
  const state: Float32Array = results[0].state;
  const nearestId: bigint | undefined = results[0].nearest?.id;
  const stop: string = results[0].stopReason;

  const e: EnergyResult = await client.energy('demo', [[0.1, 0.2, 0.3, 0.4]], { gradient: true });
  const energies: number[] = e.energies;
  const grad: Float32Array | null = e.gradients;
  const scored = await client.energy('demo', [[0.1, 0.2, 0.3, 0.4]], { novelty: true, filter: { lang: 'en' } });
  const novelty: Float64Array | null = scored.novelty;
  const noveltyZ: Float64Array | null = scored.noveltyZ;
  assertType<Equal<EnergyResult['novelty'], Float64Array | null>>();
  assertType<Equal<EnergyResult['noveltyZ'], Float64Array | null>>();

  const filter: Filter = { lang: 'en', year: { min: 2000, max: 2009 }, tag: ['a', 'b'], n: [1, 2n], id: 7, from: { min: 3 } };
  const [hit] = await client.retrieve('kv', [1, 0, 0, 0], { filter, maxSteps: 10 });
  const value: Float32Array | null = hit.value;
  const readout: Float32Array | null = (await client.energy('kv', [[1, 0, 0, 0]], { filter: { lang: 'en' } })).values;
  await client.sample('kv', { count: 1, filter: { year: { max: 2009 } } });
  for await (const frame of client.sampleStream('kv', { filter: { tag: ['a'] } })) void frame;
  const raw: FilterMessage = toFilter(filter);
  assertType<Equal<typeof raw.conditions[0]['key'], string>>();

  const sampled: SampleResponse = await client.sample('demo', {
    count: 3, seed: 5n, sampler: 'heun', schedule: { kind: 'karras', sigmaMax: 20, steps: 32 }, churn: 0,
  });
  const cls: string = sampled.samples[0].sampleClass;
  const stream = client.sampleStream('demo', { count: 2, trajectoryEvery: 1 });
  for await (const frame of stream) {
    const f: SampleFrame = frame;
    const s: Float32Array = f.states;
    if (f.result) break;
    void s;
  }
  stream.cancel();
  const snap = await client.backup('snap-1');

  try {
    await client.getBank('missing');
  } catch (err) {
    if (err instanceof EngramError && err.code === status.NOT_FOUND) {
      const name: string = err.codeName;
      const n: number = err.attempts;
      void name; void n;
    }
  }
  const proto = toProtoEnum('StateKind', 'bipolar');
  const short = fromProtoEnum('StopReason', 'STOP_REASON_CONVERGED');
  client.close();

  // Wrong uses must not compile.
  // @ts-expect-error: the dimension is a number
  await client.createBank('x', '4');
  // @ts-expect-error: unknown state kind
  await client.createBank('x', 4, { kind: 'complex' });
  // @ts-expect-error: store needs the bank name
  await client.store([[1, 2]]);
  // @ts-expect-error: ids are uint64, not booleans
  await client.getPatterns('demo', { ids: [true] });
  // @ts-expect-error: unknown option
  await client.retrieve('demo', [1, 2], { maxStep: 3 });
  // @ts-expect-error: unknown dynamics
  await client.retrieve('demo', [1, 2], { dynamics: 'fast' });
  // @ts-expect-error: labels are strings or integers
  await client.store('kv', [[1, 0, 0, 0]], { values: [[1, 2]], labels: [{ flag: true }] });
  // @ts-expect-error: labels are one object per pattern
  await client.store('kv', [[1, 0, 0, 0]], { values: [[1, 2]], labels: { lang: 'en' } });
  // @ts-expect-error: a filter test is not a boolean
  await client.retrieve('kv', [1, 0, 0, 0], { filter: { lang: true } });
  // @ts-expect-error: ranges have min and max only
  await client.energy('kv', [1, 0, 0, 0], { filter: { year: { min: 1, step: 2 } } });
  // @ts-expect-error: an empty range
  await client.sample('kv', { filter: { year: {} } });
  // @ts-expect-error: arrays do not mix strings and integers
  await client.retrieve('kv', [1, 0, 0, 0], { filter: { n: [1, 'a'] } });
  // @ts-expect-error: value readouts may be absent
  const always: Float32Array = hit.value;
  // @ts-expect-error: novelty is a flag
  await client.energy('demo', [1, 0, 0, 0], { novelty: 'yes' });
  // @ts-expect-error: novelty may be absent (not requested)
  const rated: Float64Array = scored.novelty;

  return names.length + floats.length + payload.length + page.nextPageStart + removed + state.length +
    Number(nearestId ?? 0n) + stop.length + energies.length + (grad ? grad.length : 0) + cls.length +
    snap.bytes + String(proto).length + String(short).length + valueDim + ttl + values.length +
    String(label).length + expires.length + (value ? value.length : 0) + (readout ? readout.length : 0) +
    raw.conditions.length + always.length + (novelty ? novelty.length : 0) +
    (noveltyZ ? noveltyZ.length : 0) + rated.length;
}
