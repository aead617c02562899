#!/usr/bin/env bash
# Regenerate pipeline/data/imagenet_classes.json from the npm package
# @tensorflow-models/mobilenet (Apache-2.0), which ships the 1000 ImageNet
# class names in dist/imagenet_classes.js. Needs node and npm; run from anywhere.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent @tensorflow-models/mobilenet@2.1.1 >/dev/null
tar xzf tensorflow-models-mobilenet-*.tgz
node -e '
const c = require("./package/dist/imagenet_classes.js").IMAGENET_CLASSES;
const names = Array.from({length: 1000}, (_, i) => c[i]);
process.stdout.write(JSON.stringify({
  source: "npm @tensorflow-models/mobilenet@2.1.1 dist/imagenet_classes.js (Apache-2.0)",
  classes: names}, null, 1) + "\n");
' > "$repo/pipeline/data/imagenet_classes.json"
echo "wrote $repo/pipeline/data/imagenet_classes.json"
