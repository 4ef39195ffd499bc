// What bin/imgbd runs, by the path it was called by. Node resolves this file's links before it
// looks for the package beside it, so a linked bin directory still finds the CLI.
require('../dist/src/cli/start.cjs');
