'use strict';
// engram-client: a Node.js client for engramd.
//
//   const { Client } = require('engram-client');
//   const client = new Client('127.0.0.1:50051');
//   await client.createBank('demo', 3, { energy: { family: 'lse', beta: 4 } });
//   const ids = await client.store('demo', [[1, 0, 0], [0, 1, 0]]);
//   const [r] = await client.retrieve('demo', [0.9, 0.2, 0]);
//   client.close();

const { Client, DEFAULTS } = require('./client');
const { EngramError } = require('./errors');
const { toProtoEnum, fromProtoEnum, filterIn: toFilter } = require('./convert');
const { protoDir } = require('./proto');
const { status } = require('@grpc/grpc-js');

module.exports = { Client, EngramError, DEFAULTS, status, toProtoEnum, fromProtoEnum, toFilter, protoDir };
