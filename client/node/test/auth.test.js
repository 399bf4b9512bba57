'use strict';
// Bearer-token authentication against an engramd started with a token.

const assert = require('node:assert/strict');
const { describe, it, before, after } = require('node:test');
const { Client, EngramError } = require('..');
const { startEngramd, engramdPath } = require('../testing/engramd');

const TOKEN = 'node-client-token-7f3a';

describe('token authentication', { skip: engramdPath() ? false : 'set ENGRAMD to the engramd binary' }, () => {
  let server;

  before(async () => { server = await startEngramd({ token: TOKEN }); });
  after(async () => { if (server) await server.stop(); });

  for (const [label, token] of [['a missing token', undefined], ['a wrong token', 'not-the-token'],
    ['a prefix of the token', TOKEN.slice(0, -1)]]) {
    it(`rejects ${label} with UNAUTHENTICATED, without retrying`, async () => {
      const client = new Client(server.target, { token, retries: 3 });
      try {
        const err = await client.listBanks().then(() => null, (e) => e);
        assert.ok(err instanceof EngramError, String(err));
        assert.equal(err.codeName, 'UNAUTHENTICATED');
        assert.equal(err.attempts, 1);
        await assert.rejects(client.createBank('denied', 4), { codeName: 'UNAUTHENTICATED' });
      } finally {
        client.close();
      }
    });
  }

  it('accepts the right token on every method', async () => {
    const client = new Client(server.target, { token: TOKEN });
    try {
      await client.createBank('allowed', 2);
      const ids = await client.store('allowed', [[1, 0], [0, 1]]);
      assert.equal(ids.length, 2);
      assert.equal((await client.retrieve('allowed', [0.9, 0.1]))[0].nearest.id, ids[0]);
      let frames = 0;
      for await (const f of client.sampleStream('allowed', { schedule: { steps: 4 } })) frames += f ? 1 : 0;
      assert.ok(frames >= 1);
      assert.deepEqual((await client.listBanks()).map((b) => b.name), ['allowed']);
      await client.deleteBank('allowed');
    } finally {
      client.close();
    }
  });
});
