'use strict';
// Test support: runs a real engramd on a free loopback port with a temporary
// data directory. Not part of the published package.
//
//   const server = await startEngramd({ token: 's3cret' });
//   ... new Client(server.target, { token: 's3cret' }) ...
//   await server.stop();  // SIGKILL, then removes the data directory

const { spawn } = require('child_process');
const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');

const live = new Set();
process.on('exit', () => {
  for (const child of live) {
    try { child.kill('SIGKILL'); } catch (_) { /* already gone */ }
  }
});

/**
 * The engramd binary: $ENGRAMD, else the repository's build/server/engramd.
 * @returns {string|null} its path, or null when neither exists
 */
function engramdPath() {
  if (process.env.ENGRAMD) return process.env.ENGRAMD;
  const built = path.join(__dirname, '..', '..', '..', 'build', 'server', 'engramd');
  return fs.existsSync(built) ? built : null;
}

/**
 * A TCP port on 127.0.0.1 that was free a moment ago.
 * @returns {Promise<number>}
 */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Resolves once `target` accepts a connection (a TLS handshake with `tls`). */
function waitForReady(target, timeoutMs, tls) {
  const probe = tls
    ? new grpc.Client(target, grpc.credentials.createSsl(tls.rootCerts || null))
    : new grpc.Client(target, grpc.credentials.createInsecure());
  return new Promise((resolve, reject) => {
    probe.waitForReady(new Date(Date.now() + timeoutMs), (err) => {
      probe.close();
      if (err) reject(err); else resolve();
    });
  });
}

/**
 * Starts engramd and resolves once its port accepts connections.
 * @param {object} [options]
 * @param {string} [options.token] bearer token the server requires
 * @param {string[]} [options.args] extra flags
 * @param {number} [options.port] listen on this port instead of a free one
 * @param {{rootCerts: Buffer}} [options.tls] the server serves TLS
 *   (--tls_cert / --tls_key in args): probe it with these roots
 * @param {number} [options.timeoutMs=20000] how long to wait for the port
 * @returns {Promise<{target: string, port: number, dataDir: string,
 *   log: () => string, stop: () => Promise<void>}>}
 */
async function startEngramd(options = {}) {
  const binary = engramdPath();
  if (!binary) throw new Error('set ENGRAMD to the engramd binary');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'engram-node-'));
  const logPath = path.join(dir, 'engramd.log');
  const env = { ...process.env };
  delete env.ENGRAM_AUTH_TOKEN;
  delete env.ENGRAM_AUTH_TOKEN_FILE;
  const args = [];
  if (options.token) {
    const tokenFile = path.join(dir, 'token');
    fs.writeFileSync(tokenFile, options.token, { mode: 0o600 });
    args.push(`--auth_token_file=${tokenFile}`);
  }
  let lastError = null;
  // A port found free can be taken before engramd binds it: try a few.
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = options.port || await freePort();
    const target = `127.0.0.1:${port}`;
    const log = fs.openSync(logPath, 'a');
    const child = spawn(binary, [
      `--listen=${target}`, `--data_dir=${path.join(dir, 'data')}`, '--metrics_listen=',
      '--executor_threads=2', ...args, ...(options.args || []),
    ], { stdio: ['ignore', log, log], env });
    fs.closeSync(log);
    live.add(child);
    const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const server = {
      target,
      port,
      dataDir: dir,
      log: () => fs.readFileSync(logPath, 'utf8'),
      stop: async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await exited;
        live.delete(child);
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
    const outcome = await Promise.race([
      waitForReady(target, options.timeoutMs || 20000, options.tls).then(() => 'ready', (e) => e),
      exited.then(() => 'exited'),
    ]);
    if (outcome === 'ready') return server;
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
    live.delete(child);
    lastError = new Error(`engramd did not start (${outcome}): ${server.log()}`);
    if (outcome !== 'exited' || options.port) break;
  }
  fs.rmSync(dir, { recursive: true, force: true });
  throw lastError;
}

module.exports = { startEngramd, engramdPath, freePort };
