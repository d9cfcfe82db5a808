"""The platform's operations side: the `cytoloop` command (`ops.cli`) and the manager of the local stack of
services it starts (`ops.stack`). Beside `services/`, `jobs/` and `labelstudio/`, not inside the library: the
library (`platform/cytoloop`) never imports it."""
