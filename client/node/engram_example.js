#!/usr/bin/env node
// A small Engram client in Node.js on the engram-client package: create a
// continuous bank with the Gaussian energy, store a few patterns, recall one
// from a noisy copy, draw samples, then delete the bank.
//
//   npm ci && node engram_example.js --target 127.0.0.1:50051
//
// ENGRAM_TOKEN adds the bearer token a protected server requires.
'use strict';

// Inside this package its own name resolves to ./lib (package "exports").
const { Client, toProtoEnum } = require('engram-client');

function arg(name, fallback) {
  const i = process.argv.indexOf('--' + name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const target = arg('target', process.env.ENGRAM_TARGET || '127.0.0.1:50051');
const bank = arg('bank', 'node-example');

// A seeded generator, so the example prints the same thing every run.
function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
}

async function main() {
  const client = new Client(target, { token: process.env.ENGRAM_TOKEN, timeoutMs: 30000 });
  const n = 16;
  const k = 5;
  const rand = rng(7);
  const patterns = [];
  for (let mu = 0; mu < k; mu++) {
    const p = new Array(n).fill(0);
    p[mu * 3] = 4;  // well separated
    p[mu * 3 + 1] = -4;
    patterns.push(p);
  }
  try {
    const info = await client.createBank(bank, n, {
      kind: 'continuous', energy: { family: 'gaussian', beta: 4 },
    });
    console.log(`created ${info.name}: N=${info.dim}, energy ${toProtoEnum('EnergyFamily', info.energy.family)}`);
    try {
      const ids = await client.store(bank, patterns, {
        dim: n, payloads: patterns.map((_, i) => Buffer.from('memory-' + i)),
      });
      console.log(`stored ${ids.length} patterns, ids ${ids.join(',')}`);

      // Ids are uint64 and come back as BigInt: exact above 2^53, where a
      // JavaScript number would round.
      const bigIds = [2n ** 53n + 1n, 2n ** 64n - 1n];
      const extra = [patterns[0].map((v) => -v), patterns[1].map((v) => -v)];
      const bigStored = await client.store(bank, extra, { ids: bigIds });
      const back = await client.getPatterns(bank, { ids: bigIds });
      const exact = bigStored.join(',') === bigIds.join(',') && back.ids.join(',') === bigIds.join(',');
      console.log(`ids above 2^53 ${exact ? 'round-trip exactly' : 'were changed'}: ${back.ids.join(',')}`);
      if (!exact) return 1;
      await client.deletePatterns(bank, bigIds);

      const query = new Float32Array(patterns[3].map((v) => v + (rand() - 0.5)));
      const [result] = await client.retrieve(bank, query, { dynamics: 'sync' });
      console.log(`recalled ${result.nearest.payload.toString()} (id ${result.nearest.id}) ` +
                  `distance ${result.nearest.distance.toFixed(6)} after ${result.steps} steps, ` +
                  `${toProtoEnum('StopReason', result.stopReason)}`);

      const { samples } = await client.sample(bank, { count: 3, seed: 5, schedule: { sigmaMax: 20, steps: 32 } });
      for (const s of samples) {
        console.log(`sample: ${toProtoEnum('SampleClass', s.sampleClass)}, nearest ${s.nearest.payload.toString()}`);
      }
      return result.nearest.payload.toString() === 'memory-3' ? 0 : 1;
    } finally {
      await client.deleteBank(bank);
    }
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code), (err) => {
  console.error('engram example failed:', err.code, err.details || err.message);
  process.exit(1);
});
