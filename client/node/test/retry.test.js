'use strict';
// Retries: UNAVAILABLE is retried with backoff up to the configured count,
// and a call succeeds once the server it waited for comes up.

const assert = require('node:assert/strict');
const { describe, it } = require('node:test');
const grpc = require('@grpc/grpc-js');
const { Client, EngramError } = require('..');
const { startEngramd, engramdPath, freePort } = require('../testing/engramd');

function counter() {
  const seen = { calls: 0, times: [] };
  seen.interceptor = (options, nextCall) => {
    seen.calls++;
    seen.times.push(Date.now());
    return new grpc.InterceptingCall(nextCall(options));
  };
  return seen;
}

describe('retries', () => {
  for (const retries of [0, 1, 3]) {
    it(`fails UNAVAILABLE after exactly ${retries + 1} attempt(s) with retries = ${retries}`, async () => {
      const port = await freePort(); // nothing listens there
      const seen = counter();
      const backoffMs = 40;
      const client = new Client(`127.0.0.1:${port}`, {
        retries, backoffMs, timeoutMs: 5000, interceptors: [seen.interceptor],
      });
      try {
        const err = await client.listBanks().then(() => null, (e) => e);
        assert.ok(err instanceof EngramError, String(err));
        assert.equal(err.code, grpc.status.UNAVAILABLE);
        assert.equal(err.codeName, 'UNAVAILABLE');
        assert.equal(err.method, 'ListBanks');
        assert.equal(err.attempts, retries + 1);
        assert.equal(seen.calls, retries + 1);
        // Retry r waits at least half of backoffMs * 2^(r-1).
        for (let r = 1; r <= retries; r++) {
          const gap = seen.times[r] - seen.times[r - 1];
          assert.ok(gap >= (backoffMs * 2 ** (r - 1)) / 2 - 2, `retry ${r} came after ${gap} ms`);
        }
      } finally {
        client.close();
      }
    });
  }

  it('fails a stream UNAVAILABLE after the configured attempts', async () => {
    const port = await freePort();
    const seen = counter();
    const client = new Client(`127.0.0.1:${port}`, { retries: 2, backoffMs: 10, interceptors: [seen.interceptor] });
    try {
      await assert.rejects(async () => {
        for await (const f of client.sampleStream('any')) void f;
      }, { name: 'EngramError', codeName: 'UNAVAILABLE', attempts: 3 });
      assert.equal(seen.calls, 3);
    } finally {
      client.close();
    }
  });

  it('rejects calls on a closed client with CANCELLED', async () => {
    const client = new Client('127.0.0.1:1');
    client.close();
    await assert.rejects(client.listBanks(), { name: 'EngramError', codeName: 'CANCELLED', attempts: 0 });
  });

  it('succeeds once the server comes up during the retries',
    { skip: engramdPath() ? false : 'set ENGRAMD to the engramd binary' }, async () => {
      const port = await freePort();
      const seen = counter();
      const client = new Client(`127.0.0.1:${port}`, {
        retries: 25, backoffMs: 100, maxBackoffMs: 400, interceptors: [seen.interceptor],
      });
      let server = null;
      try {
        const pending = client.listBanks();
        while (seen.calls < 2) await new Promise((r) => setTimeout(r, 10));
        server = await startEngramd({ port });
        assert.deepEqual(await pending, []);
        assert.ok(seen.calls >= 2);
      } finally {
        client.close();
        if (server) await server.stop();
      }
    });
});
