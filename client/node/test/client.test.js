'use strict';
// Behaviour of the Client against a real engramd, checked against
// references computed here (stored patterns, the LSE energy in double
// precision, exact ids and bytes).

const assert = require('node:assert/strict');
const { describe, it, before, after } = require('node:test');
const grpc = require('@grpc/grpc-js');
const { Client, EngramError, toProtoEnum, fromProtoEnum } = require('..');
const { startEngramd, engramdPath } = require('../testing/engramd');
const { normal, uniform } = require('../testing/random');

const skip = engramdPath() ? false : 'set ENGRAMD to the engramd binary';

/** An interceptor that counts the calls (attempts) it sees. */
function counter() {
  const seen = { calls: 0 };
  seen.interceptor = (options, nextCall) => {
    seen.calls++;
    return new grpc.InterceptingCall(nextCall(options));
  };
  return seen;
}

/** K random normal vectors of dimension N, rounded to float32 as the server stores them. */
function gaussianPatterns(k, n, seed) {
  const g = normal(seed);
  return Array.from({ length: k }, () => Array.from({ length: n }, () => Math.fround(g())));
}

/** LSE energy and gradient in double: E = -1/b log sum exp(b xi.x) + |x|^2 / 2. */
function lseReference(patterns, x, beta) {
  const dots = patterns.map((xi) => xi.reduce((s, v, i) => s + v * x[i], 0));
  const m = Math.max(...dots);
  const w = dots.map((d) => Math.exp(beta * (d - m)));
  const z = w.reduce((s, v) => s + v, 0);
  const sq = x.reduce((s, v) => s + v * v, 0);
  const energy = -(m + Math.log(z) / beta) + sq / 2;
  const gradient = x.map((v, i) => v - patterns.reduce((s, xi, mu) => s + (w[mu] / z) * xi[i], 0));
  return { energy, gradient };
}

describe('Client against engramd', { skip }, () => {
  let server;
  let client;

  before(async () => {
    server = await startEngramd();
    client = new Client(server.target, { timeoutMs: 20000 });
  });

  after(async () => {
    if (client) client.close();
    if (server) await server.stop();
  });

  it('creates, describes, lists and deletes banks', async () => {
    const info = await client.createBank('lifecycle', 8, { kind: 'bipolar' });
    assert.equal(info.name, 'lifecycle');
    assert.equal(info.dim, 8);
    assert.equal(info.kind, 'bipolar');
    assert.equal(info.energy.family, 'classical'); // the bipolar default
    assert.equal(info.patterns, 0);
    // Proto enum names and numbers are accepted as well as short names.
    const b = await client.createBank('lifecycle-b', 8, {
      kind: 'STATE_KIND_CONTINUOUS', energy: { family: toProtoEnum('EnergyFamily', 'gaussian'), beta: 2 },
      precision: 1,
    });
    assert.deepEqual([b.kind, b.energy.family, b.energy.beta, b.precision], ['continuous', 'gaussian', 2, 'f32']);
    assert.deepEqual((await client.listBanks()).map((x) => x.name).filter((n) => n.startsWith('lifecycle')),
      ['lifecycle', 'lifecycle-b']);
    assert.equal((await client.getBank('lifecycle-b')).dim, 8);
    await client.deleteBank('lifecycle');
    await client.deleteBank('lifecycle-b');
    assert.equal((await client.listBanks()).filter((x) => x.name.startsWith('lifecycle')).length, 0);
    const dup = await client.createBank('lifecycle', 4);
    assert.equal(dup.kind, 'continuous');
    await assert.rejects(client.createBank('lifecycle', 4), { name: 'EngramError', codeName: 'ALREADY_EXISTS' });
    await client.deleteBank('lifecycle');
  });

  it('recalls a stored continuous pattern from a corrupted copy', async () => {
    const n = 32;
    const patterns = gaussianPatterns(8, n, 11);
    // beta = 4: the fixed point near xi_t is xi_t up to softmax weights
    // exp(-beta (|xi_t|^2 - xi_mu . xi_t)) < 1e-6 on the others for these patterns.
    await client.createBank('recall-lse', n, { energy: { family: 'lse', beta: 4 } });
    try {
      const ids = await client.store('recall-lse', patterns, { dim: n });
      const u = uniform(12);
      const g = normal(13);
      for (const target of [2, 5]) {
        // 40 % of the coordinates replaced by noise.
        const query = new Float32Array(patterns[target].map((v) => (u() < 0.4 ? g() : v)));
        const [r] = await client.retrieve('recall-lse', query, { dynamics: 'sync', maxSteps: 200 });
        assert.ok(r.state instanceof Float32Array);
        assert.equal(r.state.length, n);
        assert.equal(r.nearest.id, ids[target]);
        assert.ok(r.converged, `stopped ${r.stopReason}`);
        assert.ok(r.energyEnd <= r.energyStart);
        const err = Math.max(...patterns[target].map((v, i) => Math.abs(v - r.state[i])));
        assert.ok(err < 1e-4, `max |x - xi| = ${err}`);
      }
    } finally {
      await client.deleteBank('recall-lse');
    }
  });

  it('recalls a stored bipolar pattern exactly from a copy with flipped bits', async () => {
    const n = 100;
    const u = uniform(21);
    const patterns = Array.from({ length: 4 }, () => Array.from({ length: n }, () => (u() < 0.5 ? -1 : 1)));
    await client.createBank('recall-bipolar', n, { kind: 'bipolar' });
    try {
      const ids = await client.store('recall-bipolar', patterns);
      const query = patterns[1].slice();
      for (let i = 0; i < n; i += 10) query[i] = -query[i]; // 10 flips
      const [r] = await client.retrieve('recall-bipolar', query);
      assert.deepEqual(Array.from(r.state), patterns[1]);
      assert.equal(r.nearest.id, ids[1]);
      assert.equal(r.nearest.distance, 0);
      assert.equal(r.stopReason, 'converged');
    } finally {
      await client.deleteBank('recall-bipolar');
    }
  });

  it('reports the LSE energy and gradient of a double-precision reference', async () => {
    // Tolerance. The server forms the similarities xi.x and |x|^2 in float
    // (the log-sum-exp terms in double), so each carries a rounding error of
    // at most N u sum_i |a_i b_i| (u = 2^-24, the float summation bound); the
    // energy must agree within N u (max_mu sum_i |xi_mu,i x_i| + |x|^2) + 1e-9,
    // about 1e-5 here. The gradient x - sum_mu softmax_mu xi_mu moves by
    // beta max|xi| times that at most: it must agree within 1e-5 per coordinate.
    const n = 16;
    const u = 2 ** -24;
    const patterns = gaussianPatterns(6, n, 31);
    const beta = 0.5;
    await client.createBank('energy-lse', n, { energy: { family: 'lse', beta } });
    try {
      await client.store('energy-lse', new Float32Array(patterns.flat()));
      const g = normal(32);
      const states = [
        Array.from({ length: n }, () => Math.fround(g())),
        Array.from({ length: n }, () => Math.fround(2 * g())),
        patterns[3].map((v) => Math.fround(v + 0.1 * g())),
        new Array(n).fill(0),
      ];
      const tolerance = (x) => n * u * (Math.max(...patterns.map((xi) => xi.reduce((s, v, i) => s + Math.abs(v * x[i]), 0))) +
        x.reduce((s, v) => s + v * v, 0)) + 1e-9;
      const { energies, gradients } = await client.energy('energy-lse', states, { gradient: true, dim: n });
      assert.equal(energies.length, states.length);
      assert.equal(gradients.length, states.length * n);
      states.forEach((x, b) => {
        const ref = lseReference(patterns, x, beta);
        assert.ok(Math.abs(energies[b] - ref.energy) <= tolerance(x),
          `state ${b}: server ${energies[b]} reference ${ref.energy} tolerance ${tolerance(x)}`);
        ref.gradient.forEach((v, i) => assert.ok(Math.abs(gradients[b * n + i] - v) <= 1e-5,
          `state ${b} grad[${i}]: server ${gradients[b * n + i]} reference ${v}`));
      });
      // A per-call energy override: beta = 2.
      const [e2] = (await client.energy('energy-lse', [states[0]], { energy: { family: 'lse', beta: 2 } })).energies;
      assert.ok(Math.abs(e2 - lseReference(patterns, states[0], 2).energy) <= tolerance(states[0]));
    } finally {
      await client.deleteBank('energy-lse');
    }
  });

  it('round-trips uint64 ids above 2^53, payload bytes and floats exactly', async () => {
    const ids = [2n ** 53n + 1n, 2n ** 64n - 1n, 0n, 12345n];
    const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    const payloads = [all, Buffer.alloc(0), Buffer.from([0, 0, 255, 0]), 'ünïcode ✓'];
    const patterns = new Float32Array([1e-38, -0, 3.4e38, Math.PI, -1, 1.5e-45, 0.1, 7]);
    await client.createBank('exact', 2);
    try {
      const stored = await client.store('exact', patterns, { ids, payloads, dim: 2 });
      assert.deepEqual(stored, ids);
      // The same ids given as decimal strings and a safe number.
      const back = await client.getPatterns('exact', { ids: ['18446744073709551615', '9007199254740993', 12345, 0n] });
      assert.deepEqual(back.ids, [ids[1], ids[0], ids[3], ids[2]]);
      assert.equal(back.dim, 2);
      const expect = new Float32Array([patterns[2], patterns[3], patterns[0], patterns[1],
        patterns[6], patterns[7], patterns[4], patterns[5]]);
      assert.deepEqual(Buffer.from(back.patterns.buffer), Buffer.from(expect.buffer)); // bit for bit
      assert.deepEqual(back.payloads, [payloads[1], payloads[0], Buffer.from('ünïcode ✓'), payloads[2]]);
      const page = await client.getPatterns('exact', { pageStart: 0, pageSize: 3 });
      assert.equal(page.ids.length, 3);
      assert.equal(page.nextPageStart, 3);
      assert.deepEqual(await client.deletePatterns('exact', [2n ** 64n - 1n, '0']), { deleted: 2, bankPatterns: 2 });
      await assert.rejects(client.getPatterns('exact', { ids: [2n ** 64n - 1n] }), { codeName: 'NOT_FOUND' });
    } finally {
      await client.deleteBank('exact');
    }
  });

  it('rejects ids outside uint64 before sending anything', async () => {
    for (const bad of [2n ** 64n, -1n, 2 ** 53, 1.5, 'x1']) {
      await assert.rejects(client.store('whatever', [[1]], { ids: [bad] }),
        (e) => e instanceof EngramError && e.codeName === 'INVALID_ARGUMENT' && e.attempts === 0);
    }
  });

  it('rejects an unknown bank with NOT_FOUND', async () => {
    const seen = counter();
    const c = new Client(server.target, { interceptors: [seen.interceptor], retries: 3, backoffMs: 10 });
    try {
      for (const call of [() => c.getBank('no-such-bank'), () => c.retrieve('no-such-bank', [1, 2]),
        () => c.store('no-such-bank', [[1, 2]]), () => c.deleteBank('no-such-bank')]) {
        const err = await call().then(() => null, (e) => e);
        assert.ok(err instanceof EngramError, String(err));
        assert.ok(err instanceof Error);
        assert.equal(err.code, grpc.status.NOT_FOUND);
        assert.equal(err.codeName, 'NOT_FOUND');
        assert.match(err.details, /no-such-bank/);
        assert.equal(err.message, `NOT_FOUND: ${err.details}`);
        assert.equal(err.attempts, 1);
      }
      assert.equal(seen.calls, 4);
    } finally {
      c.close();
    }
  });

  it('rejects a wrong dimension with INVALID_ARGUMENT and does not retry it', async () => {
    await client.createBank('dim4', 4);
    const seen = counter();
    const c = new Client(server.target, { interceptors: [seen.interceptor], retries: 5, backoffMs: 10 });
    try {
      await c.store('dim4', [[1, 2, 3, 4]]);
      assert.equal(seen.calls, 1);
      for (const call of [() => c.store('dim4', new Float32Array(6)), () => c.retrieve('dim4', [1, 2, 3]),
        () => c.energy('dim4', [[1, 2, 3, 4, 5]])]) {
        const before = seen.calls;
        await assert.rejects(call(), (e) => e instanceof EngramError &&
          e.code === grpc.status.INVALID_ARGUMENT && e.codeName === 'INVALID_ARGUMENT' && e.attempts === 1);
        assert.equal(seen.calls, before + 1, 'an INVALID_ARGUMENT call was retried');
      }
      // With `dim` the client checks the shape itself and sends nothing.
      const before = seen.calls;
      await assert.rejects(c.store('dim4', [[1, 2, 3]], { dim: 4 }), { codeName: 'INVALID_ARGUMENT', attempts: 0 });
      await assert.rejects(c.store('dim4', [[1, 2, 3, 4], [1, 2]]), { codeName: 'INVALID_ARGUMENT', attempts: 0 });
      assert.equal(seen.calls, before);
      assert.equal((await c.getBank('dim4')).patterns, 1);
    } finally {
      c.close();
      await client.deleteBank('dim4');
    }
  });

  it('samples, and streams frames whose last one carries the result', async () => {
    const n = 8;
    const patterns = [0, 1, 2].map((mu) => Array.from({ length: n }, (_, i) => (i === 2 * mu ? 4 : i === 2 * mu + 1 ? -4 : 0)));
    await client.createBank('sampling', n, { energy: { family: 'gaussian', beta: 4 } });
    try {
      await client.store('sampling', patterns, { payloads: ['m0', 'm1', 'm2'] });
      const options = { count: 3, seed: 5, sampler: 'heun', schedule: { sigmaMax: 20, steps: 16 } };
      const whole = await client.sample('sampling', options);
      assert.equal(whole.samples.length, 3);
      assert.equal(whole.sigmas.length, 17); // steps noise levels plus the final 0
      for (const s of whole.samples) {
        assert.ok(s.state instanceof Float32Array && s.state.length === n);
        assert.equal(s.sampleClass, 'memorized');
        assert.match(s.nearest.payload.toString(), /^m[012]$/);
      }

      const frames = [];
      for await (const frame of client.sampleStream('sampling', options)) frames.push(frame);
      assert.ok(frames.length >= 2, `${frames.length} frames`);
      const last = frames[frames.length - 1];
      assert.ok(last.result, 'the last frame carries the response');
      frames.slice(0, -1).forEach((f, i) => {
        assert.equal(f.result, null);
        assert.ok(f.states instanceof Float32Array);
        assert.equal(f.states.length, 3 * n);
        if (i > 0) assert.ok(f.step > frames[i - 1].step && f.sigma <= frames[i - 1].sigma);
      });
      // The streamed call with the same seed reaches the same samples.
      assert.deepEqual(last.result.samples.map((s) => Array.from(s.state)), whole.samples.map((s) => Array.from(s.state)));

      // Leaving the loop early cancels the call; the client stays usable.
      let taken = 0;
      for await (const frame of client.sampleStream('sampling', { ...options, schedule: { steps: 64 } })) {
        assert.ok(frame.states.length === 3 * n);
        if (++taken === 2) break;
      }
      const stream = client.sampleStream('sampling', options);
      await stream.next();
      stream.cancel();
      assert.equal((await client.getBank('sampling')).patterns, 3);

      await assert.rejects(async () => {
        for await (const frame of client.sampleStream('no-such-bank', options)) void frame;
      }, { name: 'EngramError', codeName: 'NOT_FOUND', method: 'SampleStream' });
    } finally {
      await client.deleteBank('sampling');
    }
  });

  it('writes a backup', async () => {
    await client.createBank('kept', 2);
    try {
      const b = await client.backup('node-snapshot');
      assert.ok(b.path.endsWith('node-snapshot'));
      assert.ok(b.bytes > 0);
      assert.ok(b.banks >= 1);
      await assert.rejects(client.backup('node-snapshot'), { codeName: 'ALREADY_EXISTS' });
    } finally {
      await client.deleteBank('kept');
    }
  });

  it('converts enum names both ways', () => {
    assert.equal(toProtoEnum('Dynamics', 'gradient'), 'DYNAMICS_GRADIENT');
    assert.equal(toProtoEnum('Precision', 'bit-packed'), 'PRECISION_BIT_PACKED');
    assert.equal(toProtoEnum('Sampler', 'SAMPLER_HEUN'), 'SAMPLER_HEUN');
    assert.equal(fromProtoEnum('SampleClass', 'SAMPLE_CLASS_MEMORIZED'), 'memorized');
    assert.equal(fromProtoEnum('StopReason', 2), 'max_steps');
    assert.throws(() => toProtoEnum('StateKind', 'complex'), { codeName: 'INVALID_ARGUMENT' });
  });
});
