#!/usr/bin/env node
// Copies the Engram API (proto/engram/v1/engram.proto of the repository) into
// this package, so a packed tarball carries its own proto. Run by `npm pack`
// (prepack); `--clean` (postpack) removes the copy again when the repository
// proto is there to fall back on, so the source tree always loads the
// repository's current proto.
'use strict';

const fs = require('fs');
const path = require('path');

const pkgDir = path.join(__dirname, '..');
const relative = path.join('engram', 'v1', 'engram.proto');
const source = path.join(pkgDir, '..', '..', 'proto', relative);
const copyRoot = path.join(pkgDir, 'proto');
const copy = path.join(copyRoot, relative);

if (process.argv.includes('--clean')) {
  if (fs.existsSync(source)) fs.rmSync(copyRoot, { recursive: true, force: true });
} else if (fs.existsSync(source)) {
  fs.mkdirSync(path.dirname(copy), { recursive: true });
  fs.copyFileSync(source, copy);
} else if (!fs.existsSync(copy)) {
  console.error(`copy_proto: neither ${source} nor ${copy} exists`);
  process.exit(1);
}
