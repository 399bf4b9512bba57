'use strict';
// TLS: a client given the server's root certificate connects; one without
// it fails the handshake (UNAVAILABLE).

const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { describe, it, before, after } = require('node:test');
const { Client } = require('..');
const { startEngramd, engramdPath } = require('../testing/engramd');

function haveOpenssl() {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch (_) {
    return false;
  }
}

const skip = !engramdPath() ? 'set ENGRAMD to the engramd binary' : !haveOpenssl() ? 'openssl not found' : false;

describe('TLS', { skip }, () => {
  let dir;
  let server;
  let cert;

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'engram-node-tls-'));
    const certPath = path.join(dir, 'cert.pem');
    const keyPath = path.join(dir, 'key.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
      '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
      '-keyout', keyPath, '-out', certPath], { stdio: 'ignore' });
    cert = fs.readFileSync(certPath);
    server = await startEngramd({ args: [`--tls_cert=${certPath}`, `--tls_key=${keyPath}`], tls: { rootCerts: cert } });
  });

  after(async () => {
    if (server) await server.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('connects with the server certificate as root', async () => {
    const client = new Client(server.target, { rootCerts: cert });
    try {
      assert.deepEqual(await client.listBanks(), []);
    } finally {
      client.close();
    }
  });

  it('fails UNAVAILABLE without a root that verifies the server, and in plaintext', async () => {
    for (const options of [{ tls: true }, {}]) {
      const client = new Client(server.target, { ...options, retries: 0, timeoutMs: 5000 });
      try {
        await assert.rejects(client.listBanks(), { name: 'EngramError', codeName: 'UNAVAILABLE' });
      } finally {
        client.close();
      }
    }
  });
});
