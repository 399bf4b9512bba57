'use strict';
// Key -> value banks, labels with filtered calls, and time to live, against
// a real engramd. Readouts are checked against softmax(beta Xi x) V computed
// here in double precision; filtered calls against the same call on a second
// bank that holds just the patterns the filter should pass (picked here by
// the test's own predicate).

const assert = require('node:assert/strict');
const { describe, it, before, after } = require('node:test');
const grpc = require('@grpc/grpc-js');
const { Client, EngramError, toFilter } = require('..');
const { startEngramd, engramdPath } = require('../testing/engramd');
const { normal, uniform } = require('../testing/random');

const skip = engramdPath() ? false : 'set ENGRAMD to the engramd binary';
const U = 2 ** -24; // float32 unit roundoff

/** K random normal rows of dimension N, rounded to float32. */
function gaussianRows(k, n, seed) {
  const g = normal(seed);
  return Array.from({ length: k }, () => Array.from({ length: n }, () => Math.fround(g())));
}

const dot = (a, b) => a.reduce((s, v, i) => s + v * b[i], 0);
const maxAbsDiff = (a, b) => Math.max(...Array.from(a, (v, i) => Math.abs(v - b[i])));

/** The LSE readout softmax(beta Xi x) V, its weights and the energy, in double. */
function lseReadout(patterns, values, x, beta) {
  const s = patterns.map((xi) => dot(xi, x));
  const top = Math.max(...s);
  const w = s.map((v) => Math.exp(beta * (v - top)));
  const z = w.reduce((a, b) => a + b, 0);
  const p = w.map((v) => v / z);
  const value = values[0].map((_, j) => p.reduce((acc, pm, mu) => acc + pm * values[mu][j], 0));
  const energy = -(top + Math.log(z) / beta) + dot(x, x) / 2;
  return { p, value, energy };
}

/**
 * Bound on |server - reference| for readout coordinate j: the server forms
 * xi.x in float, off by dS <= N u sum_i |xi_i x_i|; that moves each softmax
 * weight by at most p_mu 2 beta dS (first order, doubled for safety) and the
 * readout by 4 beta dS max_mu |v_mu,j|; the float result adds |value| u.
 */
function readoutTolerance(patterns, values, x, beta, j) {
  const ds = x.length * U * Math.max(...patterns.map((xi) => xi.reduce((s, v, i) => s + Math.abs(v * x[i]), 0)));
  const vmax = Math.max(...values.map((v) => Math.abs(v[j])));
  return 4 * beta * ds * vmax + 2 * U * vmax + 1e-12;
}

/** An interceptor counting the calls (attempts) it sees. */
function counter() {
  const seen = { calls: 0 };
  seen.interceptor = (options, nextCall) => {
    seen.calls++;
    return new grpc.InterceptingCall(nextCall(options));
  };
  return seen;
}

describe('values, labels, filters and time to live against engramd', { skip }, () => {
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

  it('creates banks with valueDim and ttlSeconds and reports them', async () => {
    const kv = await client.createBank('info-kv', 4, { valueDim: 3, ttlSeconds: 3600n });
    const plain = await client.createBank('info-plain', 4);
    try {
      assert.deepEqual([kv.valueDim, kv.ttlSeconds], [3, 3600]);
      assert.deepEqual([plain.valueDim, plain.ttlSeconds], [0, 0]);
      const listed = (await client.listBanks()).filter((b) => b.name.startsWith('info-'));
      assert.deepEqual(listed.map((b) => [b.name, b.valueDim, b.ttlSeconds]),
        [['info-kv', 3, 3600], ['info-plain', 0, 0]]);
      assert.equal((await client.getBank('info-kv')).valueDim, 3);
      const decaying = await client.createBank('info-decay', 4, { decayHalfLifeSeconds: 60 });
      assert.equal(decaying.decayHalfLifeSeconds, 60);
      assert.equal(plain.decayHalfLifeSeconds, 0);
      const before = Date.now();
      await client.store('info-decay', [[1, 0, 0, 0]]);
      const [stored] = (await client.getPatterns('info-decay')).storedUnixMs;
      assert.ok(stored >= before && stored <= Date.now(), `${stored}`);
      await client.deleteBank('info-decay');
      await assert.rejects(
        client.createBank('info-bad', 4, { kind: 'bipolar', decayHalfLifeSeconds: 60 }),
        { codeName: 'FAILED_PRECONDITION', attempts: 1 });
      // More than 100 years.
      await assert.rejects(client.createBank('info-bad', 4, { ttlSeconds: 2n ** 40n }),
        { codeName: 'INVALID_ARGUMENT', attempts: 1 });
    } finally {
      await client.deleteBank('info-kv');
      await client.deleteBank('info-plain');
    }
  });

  it('reads out softmax(beta Xi x) V at each state of energy()', async () => {
    const n = 8;
    const m = 3;
    const beta = 0.5;
    const patterns = gaussianRows(6, n, 41);
    const values = gaussianRows(6, m, 42);
    await client.createBank('readout', n, { valueDim: m, energy: { family: 'lse', beta } });
    await client.createBank('readout-none', n, { energy: { family: 'lse', beta } });
    try {
      await client.store('readout', patterns, { values: new Float32Array(values.flat()), valueDim: m });
      await client.store('readout-none', patterns);
      const g = normal(43);
      const states = [
        Array.from({ length: n }, () => Math.fround(g())),
        Array.from({ length: n }, () => Math.fround(0.5 * g())),
        patterns[2].map((v) => Math.fround(0.3 * v + 0.2 * g())),
        new Array(n).fill(0),
      ];
      const r = await client.energy('readout', states, { dim: n });
      assert.ok(r.values instanceof Float32Array);
      assert.equal(r.values.length, states.length * m);
      let mixed = 0;
      states.forEach((x, b) => {
        const ref = lseReadout(patterns, values, x, beta);
        if (Math.max(...ref.p) < 0.9) mixed++;
        for (let j = 0; j < m; j++) {
          const tol = readoutTolerance(patterns, values, x, beta, j);
          assert.ok(tol < 1e-4, `tolerance ${tol}`);
          const got = r.values[b * m + j];
          assert.ok(Math.abs(got - ref.value[j]) <= tol,
            `state ${b} value[${j}]: server ${got} reference ${ref.value[j]} tolerance ${tol}`);
          // Neither the nearest pattern's value nor the plain mean would pass.
          const nearest = values[ref.p.indexOf(Math.max(...ref.p))][j];
          const mean = values.reduce((s, v) => s + v[j], 0) / values.length;
          if (b < 3) assert.ok(Math.abs(nearest - ref.value[j]) > 100 * tol || Math.abs(mean - ref.value[j]) > 100 * tol);
        }
      });
      assert.ok(mixed >= 2, 'the states should mix several memories');
      // At x = 0 the weights are uniform: the mean of the values.
      values[0].forEach((_, j) => assert.ok(Math.abs(r.values[3 * m + j] -
        values.reduce((s, v) => s + v[j], 0) / values.length) < 1e-6));

      const plain = await client.energy('readout-none', states);
      assert.equal(plain.values, null);
    } finally {
      await client.deleteBank('readout');
      await client.deleteBank('readout-none');
    }
  });

  it('retrieves the stored value of a key recalled from a corrupted copy', async () => {
    const n = 32;
    const m = 4;
    const beta = 10;
    const patterns = gaussianRows(8, n, 51);
    const values = gaussianRows(8, m, 52);
    await client.createBank('kv-recall', n, { valueDim: m, energy: { family: 'lse', beta } });
    try {
      const ids = await client.store('kv-recall', patterns, { values });
      const u = uniform(53);
      const g = normal(54);
      for (const target of [1, 6]) {
        const query = patterns[target].map((v) => (u() < 0.3 ? Math.fround(g()) : v));
        const [r] = await client.retrieve('kv-recall', query, { maxSteps: 200 });
        assert.ok(r.converged, `stopped ${r.stopReason}`);
        assert.equal(r.nearest.id, ids[target]);
        assert.ok(r.value instanceof Float32Array);
        assert.equal(r.value.length, m);
        const err = maxAbsDiff(r.value, values[target]);
        assert.ok(err < 1e-4, `|value - v_target| = ${err}`);
        // And the readout formula at the state reached.
        const ref = lseReadout(patterns, values, Array.from(r.state), beta);
        ref.value.forEach((v, j) => assert.ok(Math.abs(r.value[j] - v) <=
          readoutTolerance(patterns, values, Array.from(r.state), beta, j)));
      }
      // A soft energy (beta 0.05) ends at a mixture: the value is the readout
      // at the final state, not at the query.
      const soft = 0.05;
      const query = patterns[3].map((v, i) => Math.fround(v + (i % 2 ? 0.5 : -0.5)));
      const [r] = await client.retrieve('kv-recall', query, { maxSteps: 500, energy: { family: 'lse', beta: soft } });
      assert.ok(r.converged, `stopped ${r.stopReason}`);
      const state = Array.from(r.state);
      const atState = lseReadout(patterns, values, state, soft);
      const atQuery = lseReadout(patterns, values, query, soft);
      assert.ok(Math.max(...atState.p) < 0.9, 'the soft fixed point mixes memories');
      atState.value.forEach((v, j) => {
        const tol = readoutTolerance(patterns, values, state, soft, j);
        assert.ok(Math.abs(r.value[j] - v) <= tol, `value[${j}]: server ${r.value[j]} reference ${v} tolerance ${tol}`);
      });
      assert.ok(maxAbsDiff(atQuery.value, atState.value) > 1e-2, 'the readouts at the query and at the state coincide');
    } finally {
      await client.deleteBank('kv-recall');
    }
  });

  describe('filters', () => {
    const n = 16;
    const m = 2;
    const beta = 4;
    const k = 12;
    const patterns = gaussianRows(k, n, 61);
    const values = gaussianRows(k, m, 62);
    const ids = patterns.map((_, mu) => BigInt(100 + mu));
    const payloads = patterns.map((_, mu) => `p${mu}`);
    const labels = patterns.map((_, mu) => ({
      lang: ['en', 'fr', 'de'][mu % 3], year: 1995 + 2 * mu, tag: 'abcd'[mu % 4], n: mu % 5,
    }));
    // Each filter with the predicate the test expects it to apply.
    const cases = [
      ['equals', { lang: 'en' }, (l) => l.lang === 'en'],
      ['any_of', { tag: ['a', 'c'] }, (l) => l.tag === 'a' || l.tag === 'c'],
      ['int_range', { year: { min: 2000, max: 2009 } }, (l) => l.year >= 2000 && l.year <= 2009],
      ['int_any_of', { n: [1, 3n] }, (l) => l.n === 1 || l.n === 3],
      ['int_equals', { n: 2 }, (l) => l.n === 2],
      ['open range AND any_of', { lang: ['en', 'de'], year: { min: 2003 } }, (l) => l.lang !== 'fr' && l.year >= 2003],
    ];
    const subsetOf = (pred) => labels.map((l, mu) => (pred(l) ? mu : -1)).filter((mu) => mu >= 0);

    before(async () => {
      await client.createBank('catalog', n, { valueDim: m, energy: { family: 'lse', beta } });
      await client.store('catalog', patterns, { ids, payloads, values, labels });
    });

    after(async () => {
      await client.deleteBank('catalog');
    });

    /** A bank of just the rows `subset` of the catalog, in catalog order. */
    async function subsetBank(name, subset) {
      await client.createBank(name, n, { valueDim: m, energy: { family: 'lse', beta } });
      await client.store(name, subset.map((mu) => patterns[mu]), {
        ids: subset.map((mu) => ids[mu]), payloads: subset.map((mu) => payloads[mu]), values: subset.map((mu) => values[mu]),
      });
    }

    for (const [what, filter, pred] of cases) {
      it(`retrieve and energy with ${what} act as a bank of the matching patterns`, async () => {
        const subset = subsetOf(pred);
        assert.ok(subset.length > 0 && subset.length < k, `${subset.length} of ${k} pass`);
        const excluded = labels.findIndex((l) => !pred(l));
        const g = normal(63);
        const queries = [
          patterns[excluded].map((v) => Math.fround(v + 0.1 * g())),
          patterns[subset[0]].map((v) => Math.fround(v + 0.3 * g())),
          Array.from({ length: n }, () => Math.fround(g())),
        ];
        const name = `subset-${what.replace(/[^a-z]+/g, '-')}`;
        await subsetBank(name, subset);
        try {
          const filtered = await client.retrieve('catalog', queries, { filter, maxSteps: 200 });
          const reference = await client.retrieve(name, queries, { maxSteps: 200 });
          filtered.forEach((r, q) => {
            const ref = reference[q];
            assert.ok(maxAbsDiff(r.state, ref.state) <= 1e-6, `query ${q}: |state - subset state| ${maxAbsDiff(r.state, ref.state)}`);
            assert.ok(maxAbsDiff(r.value, ref.value) <= 1e-6, `query ${q}: value`);
            assert.equal(r.nearest.id, ref.nearest.id);
            assert.deepEqual(r.nearest.payload, ref.nearest.payload);
            assert.ok(subset.map((mu) => ids[mu]).includes(r.nearest.id));
          });
          // Unfiltered, the first query finds the excluded pattern it was made from.
          const [free] = await client.retrieve('catalog', queries[0]);
          assert.equal(free.nearest.id, ids[excluded]);

          // Energy and readout against the double reference over the subset;
          // near x = 0 every passing pattern weighs in (at 0: -log K / beta
          // and the mean value), so each one's membership shows.
          const states = [...queries, new Array(n).fill(0), queries[2].map((v) => Math.fround(0.05 * v))];
          const e = await client.energy('catalog', states, { filter });
          const sp = subset.map((mu) => patterns[mu]);
          const sv = subset.map((mu) => values[mu]);
          states.forEach((x, b) => {
            const ref = lseReadout(sp, sv, x, beta);
            const tolE = n * U * (Math.max(...sp.map((xi) => xi.reduce((s, v, i) => s + Math.abs(v * x[i]), 0))) + dot(x, x)) + 1e-9;
            assert.ok(Math.abs(e.energies[b] - ref.energy) <= tolE, `state ${b}: energy ${e.energies[b]} reference ${ref.energy}`);
            ref.value.forEach((v, j) => assert.ok(Math.abs(e.values[b * m + j] - v) <= readoutTolerance(sp, sv, x, beta, j),
              `state ${b} value[${j}]: server ${e.values[b * m + j]} reference ${v}`));
          });
        } finally {
          await client.deleteBank(name);
        }
      });
    }

    it('samples (and streams) as from a bank of the matching patterns', async () => {
      const [, filter, pred] = cases[2];
      const subset = subsetOf(pred);
      await subsetBank('subset-sample', subset);
      try {
        const options = { count: 3, seed: 9, sampler: 'heun', schedule: { sigmaMax: 10, steps: 24 } };
        const filtered = await client.sample('catalog', { ...options, filter });
        const reference = await client.sample('subset-sample', options);
        assert.deepEqual(filtered.samples.map((s) => Array.from(s.state)), reference.samples.map((s) => Array.from(s.state)));
        assert.deepEqual(filtered.samples.map((s) => s.nearest.id), reference.samples.map((s) => s.nearest.id));
        for (const s of filtered.samples) assert.ok(subset.map((mu) => ids[mu]).includes(s.nearest.id));
        let last = null;
        for await (const frame of client.sampleStream('catalog', { ...options, filter })) last = frame;
        assert.deepEqual(last.result.samples.map((s) => Array.from(s.state)), reference.samples.map((s) => Array.from(s.state)));
      } finally {
        await client.deleteBank('subset-sample');
      }
    });

    it('answers FAILED_PRECONDITION when no pattern passes', async () => {
      // An integer test on a string label matches nothing, as does an absent key.
      for (const [filter, pred] of [
        [{ lang: 'xx' }, (l) => l.lang === 'xx'],
        [{ year: { min: 3000 } }, (l) => l.year >= 3000],
        [{ lang: 5 }, () => false],
        [{ missing: 'x' }, () => false],
        [{ lang: 'en', n: 2 }, (l) => l.lang === 'en' && l.n === 2],
      ]) {
        assert.equal(subsetOf(pred).length, 0);
        const failed = (e) => e instanceof EngramError && e.code === grpc.status.FAILED_PRECONDITION &&
          e.codeName === 'FAILED_PRECONDITION' && e.attempts === 1;
        await assert.rejects(client.retrieve('catalog', patterns[0], { filter }), failed);
        await assert.rejects(client.sample('catalog', { filter }), failed);
      }
      await assert.rejects(async () => {
        for await (const frame of client.sampleStream('catalog', { filter: { lang: 'xx' } })) void frame;
      }, { codeName: 'FAILED_PRECONDITION', method: 'SampleStream' });
    });

    it('rejects malformed filters: TypeError before sending, INVALID_ARGUMENT from the server', async () => {
      const seen = counter();
      const c = new Client(server.target, { interceptors: [seen.interceptor] });
      try {
        const typeErrors = [{ lang: true }, { lang: null }, { n: [1, 'a'] }, { n: [] }, { n: 1.5 }, { n: 2 ** 60 },
          { year: { min: 1, step: 2 } }, { year: {} }, { year: { min: 1.5 } }, { tag: [['a']] }, 'lang=en',
          [{ key: 'lang', equals: 'en' }], new Map([['lang', 'en']])];
        for (const filter of typeErrors) {
          for (const call of [() => c.retrieve('catalog', patterns[0], { filter }),
            () => c.energy('catalog', patterns[0], { filter }), () => c.sample('catalog', { filter }),
            async () => { for await (const f of c.sampleStream('catalog', { filter })) void f; }]) {
            await assert.rejects(call(), TypeError, `filter ${String(filter)}`);
          }
          assert.throws(() => toFilter(filter), TypeError);
        }
        await assert.rejects(c.retrieve('catalog', patterns[0], { filter: { n: 2n ** 63n } }), RangeError);
        assert.equal(seen.calls, 0, 'a malformed filter was sent');

        const invalid = [{ year: { min: 2010, max: 2000 } }, { '': 'x' }, { tag: Array.from({ length: 1025 }, (_, i) => `t${i}`) },
          Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, 'x']))];
        for (const filter of invalid) {
          for (const call of [() => c.retrieve('catalog', patterns[0], { filter }),
            () => c.energy('catalog', patterns[0], { filter }), () => c.sample('catalog', { filter })]) {
            await assert.rejects(call(), (e) => e instanceof EngramError && e.codeName === 'INVALID_ARGUMENT' && e.attempts === 1);
          }
        }
        // The raw form: the proto Filter, int64 as decimal strings.
        assert.deepEqual(toFilter({ lang: 'en', tag: ['a'], n: [1, 2n], id: 7n, year: { max: 2009 } }), {
          conditions: [
            { key: 'lang', equals: 'en' },
            { key: 'tag', anyOf: { values: ['a'] } },
            { key: 'n', intAnyOf: { values: ['1', '2'] } },
            { key: 'id', intEquals: '7' },
            { key: 'year', intRange: { min: '-9223372036854775808', max: '2009' } },
          ],
        });
      } finally {
        c.close();
      }
    });
  });

  it('round-trips values, labels and expiry times through getPatterns', async () => {
    await client.createBank('roundtrip', 2, { valueDim: 3, ttlSeconds: 7200 });
    await client.createBank('roundtrip-forever', 2);
    try {
      const values = new Float32Array([-0, 1e-38, 3.4e38, 1.5e-45, Math.PI, -7]);
      const labels = [
        { lang: 'en', year: 2001, big: 2n ** 63n - 1n, neg: -(2n ** 63n), zero: 0, empty: '', 'ключ': 'значение ✓', ['__proto__']: 'own' },
        {},
      ];
      const t0 = Date.now();
      const ids = await client.store('roundtrip', [[1, 0], [0, 1]], { values, labels, ttlSeconds: 60 });
      const t1 = Date.now();
      const [late] = await client.store('roundtrip', [[1, 1]], { values: [[1, 2, 3]], labels: [null] });
      const t2 = Date.now();
      const [forever] = await client.store('roundtrip-forever', [[1, 1]], { labels: [{ a: 'b' }] });

      const back = await client.getPatterns('roundtrip', { ids: [late, ids[1], ids[0]] });
      const expect = new Float32Array([1, 2, 3, ...values.subarray(3), ...values.subarray(0, 3)]);
      assert.deepEqual(Buffer.from(back.values.buffer), Buffer.from(expect.buffer)); // bit for bit
      assert.deepEqual(back.labels, [{}, {}, {
        lang: 'en', year: 2001n, big: 2n ** 63n - 1n, neg: -(2n ** 63n), zero: 0n, empty: '', 'ключ': 'значение ✓', ['__proto__']: 'own',
      }]);
      assert.equal(Object.getPrototypeOf(back.labels[2]), Object.prototype);
      const [eLate, e1, e0] = back.expiresUnixMs;
      assert.equal(e0, e1);
      assert.ok(e0 >= t0 + 60000 && e0 <= t1 + 60000, `expires ${e0 - t0} ms after the store`);
      assert.ok(eLate >= t1 + 7200000 && eLate <= t2 + 7200000, 'the bank default applies');

      const plain = await client.getPatterns('roundtrip-forever', { ids: [forever] });
      assert.deepEqual([plain.values.length, plain.labels, plain.expiresUnixMs], [0, [{ a: 'b' }], [0]]);
    } finally {
      await client.deleteBank('roundtrip');
      await client.deleteBank('roundtrip-forever');
    }
  });

  it('rejects labels that are neither strings nor int64 integers before sending', async () => {
    const seen = counter();
    const c = new Client(server.target, { interceptors: [seen.interceptor] });
    await client.createBank('labels-bad', 2);
    try {
      for (const bad of [[{ a: 1.5 }], [{ a: true }], [{ a: null }], [{ a: {} }], [{ a: [1] }], [{ a: 2 ** 53 }],
        ['x'], [[1]], [new Map()], { a: 1 }]) {
        await assert.rejects(c.store('labels-bad', [[1, 0]], { labels: bad }), TypeError, JSON.stringify(bad));
      }
      await assert.rejects(c.store('labels-bad', [[1, 0]], { labels: [{ a: 2n ** 63n }] }), RangeError);
      assert.equal(seen.calls, 0);
      // The server's checks: one Labels per pattern, keys of 1 to 256 bytes.
      for (const bad of [[{ a: 'x' }], [{ '': 'x' }, {}], [{ ['k'.repeat(257)]: 1 }, {}]]) {
        await assert.rejects(c.store('labels-bad', [[1, 0], [0, 1]], { labels: bad }), { codeName: 'INVALID_ARGUMENT', attempts: 1 });
      }
      assert.equal((await c.getBank('labels-bad')).patterns, 0);
    } finally {
      c.close();
      await client.deleteBank('labels-bad');
    }
  });

  it('rejects values of the wrong shape or not finite, leaving the bank unchanged', async () => {
    await client.createBank('values-bad', 2, { valueDim: 3 });
    await client.createBank('values-none', 2);
    try {
      await client.store('values-bad', [[1, 0]], { values: [0.5, 0.25, 0.125], ids: [1], labels: [{ k: 'v' }] });
      const snapshot = async () => {
        const p = await client.getPatterns('values-bad');
        return [p.ids, Array.from(p.patterns), Array.from(p.values), p.labels, (await client.getBank('values-bad')).patterns];
      };
      const before = await snapshot();
      const pair = [[0, 1], [1, 1]];
      const invalid = [
        { values: new Float32Array(5) }, // 5 floats for 2 patterns of M = 3
        {}, // values are required on a bank with values
        { values: [[1, 2, 3], [4, NaN, 6]] },
        { values: [[1, 2, 3], [4, Infinity, 6]] },
        { values: new Float32Array(6), ttlSeconds: 2n ** 40n }, // more than 100 years
      ];
      for (const options of invalid) {
        await assert.rejects(client.store('values-bad', pair, options),
          (e) => e instanceof EngramError && e.codeName === 'INVALID_ARGUMENT' && e.attempts === 1);
        assert.deepEqual(await snapshot(), before);
      }
      // With valueDim the client checks row widths itself.
      await assert.rejects(client.store('values-bad', pair, { values: [[1, 2], [3, 4]], valueDim: 3 }),
        { codeName: 'INVALID_ARGUMENT', attempts: 0 });
      // A bank without values takes none.
      await assert.rejects(client.store('values-none', [[1, 0]], { values: [1, 2, 3] }), { codeName: 'INVALID_ARGUMENT' });
      assert.equal((await client.getBank('values-none')).patterns, 0);
      assert.deepEqual(await snapshot(), before);
      // The bank still takes a good batch.
      await client.store('values-bad', pair, { values: new Float32Array(6) });
      assert.equal((await client.getBank('values-bad')).patterns, 3);
    } finally {
      await client.deleteBank('values-bad');
      await client.deleteBank('values-none');
    }
  });

  it('drops a pattern whose ttlSeconds ran out: from recall at once, from the bank at the next sweep', async () => {
    await client.createBank('ttl', 4, { energy: { family: 'lse', beta: 4 } });
    try {
      const t0 = Date.now();
      const [short] = await client.store('ttl', [[2, 0, 0, 0]], { ttlSeconds: 1 });
      const [kept] = await client.store('ttl', [[0, 2, 0, 0]]);
      const query = [1.8, 0.3, 0, 0];
      assert.equal((await client.retrieve('ttl', query))[0].nearest.id, short);
      const [expires] = (await client.getPatterns('ttl', { ids: [short] })).expiresUnixMs;
      assert.ok(expires >= t0 + 1000 && expires <= Date.now() + 1000, `expires ${expires - t0} ms after the store`);

      // Past its expiry, recall no longer sees it (the sweep may not have run).
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, expires - Date.now()) + 20));
      assert.equal((await client.retrieve('ttl', query))[0].nearest.id, kept);

      // Deleted within the sweep interval (1 s) plus slack; polled, bounded.
      const deadline = expires + 2500;
      let gone = null;
      while (gone === null && Date.now() < deadline) {
        const ids = (await client.getPatterns('ttl')).ids;
        if (!ids.includes(short)) gone = Date.now();
        else await new Promise((resolve) => setTimeout(resolve, 50));
      }
      assert.ok(gone !== null, `still stored ${Date.now() - expires} ms after its expiry`);
      assert.ok(gone >= expires, 'deleted before it expired');
      await assert.rejects(client.getPatterns('ttl', { ids: [short] }), { codeName: 'NOT_FOUND' });
      const bank = await client.getBank('ttl');
      assert.equal(bank.patterns, 1);
      assert.deepEqual((await client.getPatterns('ttl')).ids, [kept]);
    } finally {
      await client.deleteBank('ttl');
    }
  });
});
