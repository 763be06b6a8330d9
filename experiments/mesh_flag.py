"""The `--mesh` flag, shared by the tools that take one (absl allows a flag name to be defined only once)."""

from absl import flags

MESH = flags.DEFINE_string("mesh", None, "Mesh axis sizes over all devices, e.g. 'fsdp=4,expert=2' (unnamed axes "
                           "are 1); each tool says what it does without one.")
