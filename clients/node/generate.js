#!/usr/bin/env node
// nanoserve-generate: stream text from a running nanoserve server.
//
//   node generate.js [--addr localhost:50051] [--max-tokens 64] [--temperature 0] [--json] PROMPT
//
// Text goes to stdout as it arrives. With --json, one JSON object with the final result
// ({request_id, output_ids, text, finish_reason, usage, num_chunks}) is printed instead, for
// scripts and tests. NANOSERVE_ADDR and NANOSERVE_AUTH_TOKEN are read from the environment.
'use strict';

const { parseArgs } = require('node:util');
const { connect, generate, DEFAULT_PROTOS_DIR } = require('./client');

const USAGE = `usage: generate.js [options] PROMPT
  --addr HOST:PORT       server address (default: $NANOSERVE_ADDR or localhost:50051)
  --max-tokens N         tokens to generate (default: the server's, 16)
  --temperature T        0 = greedy (default: the server's, 1.0)
  --top-p P, --top-k K, --seed S, --stop STR (repeatable), --ignore-eos
  --token-ids 1,2,3      send token ids instead of text
  --no-stream            ask for the Complete message only
  --json                 print one JSON result instead of streaming text
  --protos DIR           where generation.proto lives (default: ${DEFAULT_PROTOS_DIR})
  --tls                  use TLS (system roots)
  --timeout SECONDS      deadline of the call (default 600)`;

const OPTIONS = {
  addr: { type: 'string', default: process.env.NANOSERVE_ADDR || 'localhost:50051' },
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  seed: { type: 'string' },
  stop: { type: 'string', multiple: true },
  'ignore-eos': { type: 'boolean', default: false },
  'token-ids': { type: 'string' },
  'no-stream': { type: 'boolean', default: false },
  json: { type: 'boolean', default: false },
  protos: { type: 'string', default: DEFAULT_PROTOS_DIR },
  tls: { type: 'boolean', default: false },
  timeout: { type: 'string', default: '600' },
  help: { type: 'boolean', short: 'h', default: false },
};

/** GenerateRequest from parsed flags; unset sampling fields stay unset (server defaults). */
function buildRequest(values, prompt) {
  const sampling = {};
  const numbers = { 'max-tokens': 'max_tokens', temperature: 'temperature', 'top-p': 'top_p',
    'top-k': 'top_k', seed: 'seed' };
  for (const [flag, field] of Object.entries(numbers)) {
    if (values[flag] !== undefined) sampling[field] = Number(values[flag]);
  }
  if (values.stop) sampling.stop = values.stop;
  if (values['ignore-eos']) sampling.ignore_eos = true;
  const request = { sampling, stream: !values['no-stream'] };
  if (values['token-ids'] !== undefined) {
    request.token_ids = { ids: values['token-ids'].split(',').map(Number) };
  } else {
    request.text = prompt;
  }
  return request;
}

async function main() {
  const { values, positionals } = parseArgs({ options: OPTIONS, allowPositionals: true });
  if (values.help || (positionals.length !== 1 && values['token-ids'] === undefined)) {
    console.error(USAGE);
    process.exit(values.help ? 0 : 2);
  }
  const stub = connect(values.addr, { protosDir: values.protos, tls: values.tls });
  let numChunks = 0;
  const onChunk = (chunk) => {
    numChunks += 1;
    if (!values.json) process.stdout.write(chunk.text);
  };
  try {
    const result = await generate(stub, buildRequest(values, positionals[0]), {
      onChunk, token: process.env.NANOSERVE_AUTH_TOKEN, deadlineS: Number(values.timeout),
    });
    if (values.json) console.log(JSON.stringify({ ...result, num_chunks: numChunks }));
    else if (values['no-stream']) console.log(result.text);
    else process.stdout.write('\n');
  } catch (error) {
    const code = error.code !== undefined ? `${require('@grpc/grpc-js').status[error.code]}: ` : '';
    console.error(`generate failed: ${code}${error.details || error.message}`);
    process.exitCode = 1;
  } finally {
    stub.close();
  }
}

main();
