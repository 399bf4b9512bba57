'use strict';
// energy(bank, states, {novelty: true}) against a real engramd: each state's
// novelty (the mid-rank of its energy among the stored patterns' own
// energies) and its z-score, checked against a reference computed here in
// double precision from the stored patterns and the LSE energy.

const assert = require('node:assert/strict');
const { describe, it, before, after } = require('node:test');
const { Client } = require('..');
const { startEngramd, engramdPath } = require('../testing/engramd');
const { normal, uniform } = require('../testing/random');

const skip = engramdPath() ? false : 'set ENGRAMD to the engramd binary';

/** K random normal rows of dimension N, rounded to float32. */
function gaussianRows(k, n, seed, scale = 1) {
  const g = normal(seed);
  return Array.from({ length: k }, () => Array.from({ length: n }, () => Math.fround(scale * g())));
}

/** scale * a random sign vector: far from every memory of a standard normal bank. */
function farState(n, seed, scale = 5) {
  const u = uniform(seed);
  return Array.from({ length: n }, () => (u() < 0.5 ? -scale : scale));
}

const dot = (a, b) => a.reduce((s, v, i) => s + v * b[i], 0);

/** E(x) = -(1/beta) log sum_nu exp(beta xi_nu . x) + |x|^2 / 2, in double. */
function lseEnergy(patterns, x, beta) {
  const s = patterns.map((xi) => beta * dot(xi, x));
  const top = Math.max(...s);
  const z = s.reduce((acc, v) => acc + Math.exp(v - top), 0);
  return -(top + Math.log(z)) / beta + dot(x, x) / 2;
}

/**
 * Novelty and z of each state: the reference energies are E(xi_mu) (under the
 * whole bank `patterns`) of the rows `referenceRows`; novelty = (#below +
 * #equal / 2) / R, z = (E(x) - mean) / population standard deviation.
 */
function noveltyReference(referenceRows, patterns, states, beta) {
  const stored = referenceRows.map((xi) => lseEnergy(patterns, xi, beta));
  const r = stored.length;
  const mean = stored.reduce((a, b) => a + b, 0) / r;
  const std = Math.sqrt(stored.reduce((a, e) => a + (e - mean) ** 2, 0) / r);
  const energies = states.map((x) => lseEnergy(patterns, x, beta));
  const novelty = energies.map((e) =>
    (stored.filter((s) => s < e).length + 0.5 * stored.filter((s) => s === e).length) / r);
  const z = energies.map((e) => (std > 0 ? (e - mean) / std : 0));
  return { novelty, z, stored, energies };
}

/** Novelty within one rank (1/R) of the reference, z within 1e-4. */
function assertMatches(result, want, references) {
  const b = want.novelty.length;
  assert.ok(result.novelty instanceof Float64Array, 'novelty is a Float64Array');
  assert.ok(result.noveltyZ instanceof Float64Array, 'noveltyZ is a Float64Array');
  assert.equal(result.novelty.length, b);
  assert.equal(result.noveltyZ.length, b);
  for (let i = 0; i < b; i++) {
    assert.ok(Math.abs(result.novelty[i] - want.novelty[i]) <= 1 / references + 1e-12,
      `state ${i}: novelty ${result.novelty[i]}, reference ${want.novelty[i]}`);
    assert.ok(Math.abs(result.noveltyZ[i] - want.z[i]) <= 1e-4,
      `state ${i}: z ${result.noveltyZ[i]}, reference ${want.z[i]}`);
  }
}

// The documented order of the novelty reference: the splitmix64 finaliser
// of each pattern id, in wrapping uint64 arithmetic.
function noveltyKey(id) {
  const mask = (1n << 64n) - 1n;
  let z = BigInt(id);
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & mask;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & mask;
  return z ^ (z >> 31n);
}

describe('energy novelty against engramd', { skip }, () => {
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

  it('matches the mid-rank and z-score of the stored LSE energies; a far state scores exactly 1', async () => {
    const n = 16;
    const k = 40;
    const beta = 4;
    const patterns = gaussianRows(k, n, 71);
    const g = normal(72);
    const states = [
      patterns[7].map((v) => Math.fround(v + 0.05 * g())),   // near a stored pattern
      patterns[21].map((v) => Math.fround(v + 0.3 * g())),   // a noisier copy
      Array.from({ length: n }, () => Math.fround(0.5 * g())),
      farState(n, 73),                                        // far from every memory
    ];
    await client.createBank('novelty', n, { energy: { family: 'lse', beta } });
    try {
      await client.store('novelty', patterns);
      const r = await client.energy('novelty', states, { dim: n, novelty: true });
      const want = noveltyReference(patterns, patterns, states, beta);
      assertMatches(r, want, k);
      r.energies.forEach((e, i) => assert.ok(Math.abs(e - want.energies[i]) <= 1e-5 * Math.max(1, Math.abs(e))));
      assert.ok(want.energies[3] > Math.max(...want.stored));
      assert.equal(r.novelty[3], 1);
      assert.ok(r.noveltyZ[3] > 3);
      assert.ok(r.novelty[0] > 0 && r.novelty[0] < 1 && Math.abs(r.noveltyZ[0]) < 3);
      assert.equal(r.gradients, null);
      assert.equal(r.values, null);

      // Not requested: null, and the energies are the same.
      const plain = await client.energy('novelty', states);
      assert.equal(plain.novelty, null);
      assert.equal(plain.noveltyZ, null);
      assert.deepEqual(plain.energies, r.energies);
      const off = await client.energy('novelty', states, { novelty: false, gradient: true });
      assert.equal(off.novelty, null);
      assert.equal(off.noveltyZ, null);
      // With the gradient too; repeated calls (a cached reference) agree.
      const both = await client.energy('novelty', states, { novelty: true, gradient: true });
      assert.equal(both.gradients.length, states.length * n);
      assert.deepEqual(both.novelty, r.novelty);
      assert.deepEqual(both.noveltyZ, r.noveltyZ);
    } finally {
      await client.deleteBank('novelty');
    }
  });

  it('scores each stored pattern at its mid-rank, and follows an energy override', async () => {
    const n = 12;
    const k = 25;
    const patterns = gaussianRows(k, n, 74);
    await client.createBank('novelty-self', n, { energy: { family: 'lse', beta: 4 } });
    try {
      await client.store('novelty-self', patterns);
      const r = await client.energy('novelty-self', patterns, { novelty: true });
      const want = noveltyReference(patterns, patterns, patterns, 4);
      assertMatches(r, want, k);
      const sorted = [...want.stored].sort((a, b) => a - b);
      assert.equal(new Set(sorted).size, k);
      want.stored.forEach((e, mu) => {
        const mid = (sorted.indexOf(e) + 0.5) / k;
        assert.ok(Math.abs(r.novelty[mu] - mid) <= 1 / k + 1e-12);
      });
      const mean = r.noveltyZ.reduce((a, b) => a + b, 0) / k;
      const sd = Math.sqrt(r.noveltyZ.reduce((a, z) => a + (z - mean) ** 2, 0) / k);
      assert.ok(Math.abs(mean) < 1e-4 && Math.abs(sd - 1) < 1e-4, `mean ${mean}, sd ${sd}`);

      // The reference is taken under the call's energy.
      const states = [patterns[2].map((v) => Math.fround(v + 0.1)), farState(n, 75)];
      const soft = await client.energy('novelty-self', states, { energy: { family: 'lse', beta: 0.5 }, novelty: true });
      assertMatches(soft, noveltyReference(patterns, patterns, states, 0.5), k);
      assert.equal(soft.novelty[1], 1);
    } finally {
      await client.deleteBank('novelty-self');
    }
  });

  it('takes the min(K, 256) patterns of the smallest id keys and honours the filter', async () => {
    const n = 8;
    const k = 300;
    const beta = 4;
    const patterns = gaussianRows(k, n, 76);
    const labels = patterns.map((_, i) => ({ lang: i % 3 === 0 ? 'en' : 'de', year: 2000 + i }));
    const g = normal(77);
    const states = [
      patterns[5].map((v) => Math.fround(v + 0.05 * g())),
      patterns[150],
      Array.from({ length: n }, () => Math.fround(0.5 * g())),
      farState(n, 78),
    ];
    await client.createBank('novelty-stride', n, { energy: { family: 'lse', beta } });
    try {
      const ids = await client.store('novelty-stride', patterns, { labels });
      const r = await client.energy('novelty-stride', states, { novelty: true });
      // The 256 patterns of the smallest keys (splitmix64 finaliser) of their ids.
      const order = ids.map((id, i) => [noveltyKey(id), i]);
      order.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
      const reference = order.slice(0, 256).map(([, i]) => patterns[i]);
      assert.equal(reference.length, 256);
      const want = noveltyReference(reference, patterns, states, beta);
      assertMatches(r, want, reference.length);
      assert.equal(r.novelty[3], 1);
      // Not all 300 patterns, not the first 256, not an even stride.
      for (const other of [patterns, patterns.slice(0, 256), patterns.filter((_, i) => i % 2 === 0)]) {
        const z = noveltyReference(other, patterns, states, beta).z;
        assert.ok(Math.max(...z.map((v, i) => Math.abs(v - want.z[i]))) > 1e-4);
      }

      // A filter: the reference is the passing patterns (100 of them, all used).
      const filter = { lang: 'en', year: { min: 2000, max: 2299 } };
      const passing = patterns.filter((_, i) => labels[i].lang === 'en' && labels[i].year <= 2299);
      assert.equal(passing.length, 100);
      const f = await client.energy('novelty-stride', states, { novelty: true, filter });
      assertMatches(f, noveltyReference(passing, passing, states, beta), passing.length);
      assert.equal(f.novelty[3], 1);
      // A filter no pattern passes: the empty reference scores 1/2, z 0.
      const none = await client.energy('novelty-stride', states, { novelty: true, filter: { lang: 'fr' } });
      assert.deepEqual(Array.from(none.novelty), [0.5, 0.5, 0.5, 0.5]);
      assert.deepEqual(Array.from(none.noveltyZ), [0, 0, 0, 0]);
    } finally {
      await client.deleteBank('novelty-stride');
    }
  });
});
