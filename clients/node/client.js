// nanoserve's public API from Node.js: loads protos/nanoserve/v1/generation.proto at runtime
// (no generated code) and wraps the streaming Generate call.
//
// Not here: the command line (generate.js), retries, TLS setup beyond a flag.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTOS_DIR = path.resolve(__dirname, '..', '..', 'protos');

// keepCase: field names as in the .proto (request_id, max_tokens); longs as strings so uint64
// values (seed, counters) survive; enums as names (finish_reason: "LENGTH").
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

/** A GenerationStub connected to `addr` (HOST:PORT). */
function connect(addr, { protosDir = DEFAULT_PROTOS_DIR, tls = false } = {}) {
  const definition = protoLoader.loadSync(path.join('nanoserve', 'v1', 'generation.proto'), {
    ...LOADER_OPTIONS,
    includeDirs: [protosDir],
  });
  const { Generation } = grpc.loadPackageDefinition(definition).nanoserve.v1;
  const credentials = tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
  return new Generation(addr, credentials);
}

/** Call metadata: the bearer token when the server wants one (NANOSERVE_AUTH_TOKEN). */
function authMetadata(token) {
  const metadata = new grpc.Metadata();
  if (token) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

/**
 * Stream one Generate call. `onChunk({token_ids, text})` is called for every chunk; the promise
 * resolves with the Complete message ({output_ids, text, finish_reason, usage}) and the request id,
 * or rejects with the gRPC error (its `code` and `details` name the problem).
 */
function generate(stub, request, { onChunk = () => {}, token, deadlineS = 600 } = {}) {
  const deadline = new Date(Date.now() + deadlineS * 1000);
  return new Promise((resolve, reject) => {
    let complete = null;
    let requestId = '';
    const call = stub.Generate(request, authMetadata(token), { deadline });
    call.on('data', (response) => {
      requestId = response.request_id;
      if (response.response === 'chunk') onChunk(response.chunk);
      else if (response.response === 'complete') complete = response.complete;
    });
    call.on('error', reject);
    call.on('end', () => {
      if (complete === null) reject(new Error('the stream ended without a Complete message'));
      else resolve({ request_id: requestId, ...complete });
    });
  });
}

module.exports = { connect, generate, authMetadata, DEFAULT_PROTOS_DIR };
