#!/usr/bin/env node
// A small Engram client in Node.js: create a continuous bank with the
// Gaussian energy, store a few patterns, recall one from a noisy copy, draw
// samples, then delete the bank. The proto is loaded at run time with
// @grpc/proto-loader from ../../proto.
//
//   npm ci && node engram_example.js --target 127.0.0.1:50051
//
// ENGRAM_TOKEN adds the bearer token a protected server requires.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function arg(name, fallback) {
  const i = process.argv.indexOf('--' + name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const target = arg('target', process.env.ENGRAM_TARGET || '127.0.0.1:50051');
const bank = arg('bank', 'node-example');

const definition = protoLoader.loadSync('engram/v1/engram.proto', {
  includeDirs: [path.join(__dirname, '..', '..', 'proto')],
  keepCase: true,     // field names as in the proto
  longs: String,      // uint64 ids as strings
  enums: String,      // enums by name
  defaults: true,
});
const v1 = grpc.loadPackageDefinition(definition).engram.v1;
const client = new v1.MemoryService(target, grpc.credentials.createInsecure());

const metadata = new grpc.Metadata();
if (process.env.ENGRAM_TOKEN) metadata.set('authorization', 'Bearer ' + process.env.ENGRAM_TOKEN);

function call(method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 30000);
    client[method](request, metadata, { deadline }, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

// A seeded generator, so the example prints the same thing every run.
function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
}

async function main() {
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
  const info = await call('CreateBank', {
    name: bank, dim: n, kind: 'STATE_KIND_CONTINUOUS',
    energy: { family: 'ENERGY_FAMILY_GAUSSIAN', beta: 4 },
  });
  console.log(`created ${info.name}: N=${info.dim}, energy ${info.energy.family}`);
  try {
    const stored = await call('Store', {
      bank, patterns: patterns.flat(),
      payloads: patterns.map((_, i) => Buffer.from('memory-' + i)),
    });
    console.log(`stored ${stored.ids.length} patterns, ids ${stored.ids.join(',')}`);

    // Ids are uint64: with `longs: String` they travel as decimal strings,
    // exact above 2^53 where a JavaScript number would round.
    const bigIds = ['9007199254740993', '18446744073709551615'];
    const extra = [patterns[0].map((v) => -v), patterns[1].map((v) => -v)];
    const bigStored = await call('Store', { bank, patterns: extra.flat(), ids: bigIds });
    const back = await call('GetPatterns', { bank, ids: bigIds });
    const exact = bigStored.ids.join(',') === bigIds.join(',') &&
                  back.ids.join(',') === bigIds.join(',');
    console.log(`ids above 2^53 ${exact ? 'round-trip exactly' : 'were changed'}: ${back.ids.join(',')}`);
    if (!exact) return 1;
    await call('DeletePatterns', { bank, ids: bigIds });

    const query = patterns[3].map((v) => v + (rand() - 0.5));
    const result = (await call('Retrieve', { bank, queries: query, options: { dynamics: 'DYNAMICS_SYNC' } })).results[0];
    console.log(`recalled ${result.nearest.payload.toString()} (id ${result.nearest.id}) ` +
                `distance ${result.nearest.distance.toFixed(6)} after ${result.steps} steps, ${result.stop_reason}`);

    const samples = (await call('Sample', {
      bank, count: 3, seed: 5, schedule: { sigma_max: 20, steps: 32 },
    })).samples;
    for (const s of samples) {
      console.log(`sample: ${s.sample_class}, nearest ${s.nearest.payload.toString()}`);
    }
    return result.nearest.payload.toString() === 'memory-3' ? 0 : 1;
  } finally {
    await call('DeleteBank', { name: bank });
    client.close();
  }
}

main().then((code) => process.exit(code), (err) => {
  console.error('engram example failed:', err.code, err.details || err.message);
  process.exit(1);
});
