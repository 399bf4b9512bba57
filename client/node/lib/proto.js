'use strict';
// Loads the Engram API (engram/v1/engram.proto) with @grpc/proto-loader.
//
// The proto is looked up in this package's proto/ directory (where `npm pack`
// puts a copy) and then in the repository's proto/ directory two levels up,
// which is where it lives when the package is used from the source tree.

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_FILE = path.join('engram', 'v1', 'engram.proto');

/**
 * Directories searched for engram/v1/engram.proto, in order.
 * @returns {string[]} absolute directory paths
 */
function protoSearchPath() {
  const pkgDir = path.join(__dirname, '..');
  return [path.join(pkgDir, 'proto'), path.join(pkgDir, '..', '..', 'proto')];
}

/**
 * Returns the first directory of {@link protoSearchPath} that holds
 * engram/v1/engram.proto.
 * @returns {string} the include directory
 * @throws {Error} when no directory holds the proto
 */
function protoDir() {
  const dirs = protoSearchPath();
  for (const dir of dirs) {
    if (fs.existsSync(path.join(dir, PROTO_FILE))) return dir;
  }
  throw new Error(`engram-client: ${PROTO_FILE} not found in ${dirs.join(' or ')}`);
}

let cached = null;

/**
 * Loads the API once per process.
 *
 * Messages use camelCase field names, uint64 fields travel as decimal strings
 * (exact over the whole uint64 range), enums as their proto names, bytes as
 * Buffers, and absent scalar fields read as their defaults.
 * @returns {{definition: object, MemoryService: Function, enums: Object<string, Object<string, number>>}}
 *   the package definition, the generated service client constructor and
 *   every engram.v1 enum as a name → number map
 */
function load() {
  if (cached) return cached;
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protoDir()],
    keepCase: false,
    longs: String,
    enums: String,
    bytes: Buffer,
    defaults: true,
    oneofs: false,
  });
  const v1 = grpc.loadPackageDefinition(definition).engram.v1;
  const enums = {};
  for (const [fullName, entry] of Object.entries(definition)) {
    if (!fullName.startsWith('engram.v1.') || !entry || !entry.format ||
        !entry.format.includes('EnumDescriptorProto')) continue;
    const values = {};
    for (const v of entry.type.value) values[v.name] = v.number;
    enums[fullName.slice('engram.v1.'.length)] = values;
  }
  cached = { definition, MemoryService: v1.MemoryService, enums };
  return cached;
}

module.exports = { load, protoDir, protoSearchPath };
