# Sourced by the other scripts: install what is missing, then the environment every command runs in.
bash "$(dirname "${BASH_SOURCE[0]}")/install.sh"
export MUJOCO_GL=${MUJOCO_GL:-disable}   # nothing renders; avoids GLFW display errors
export WANDB_MODE=${WANDB_MODE:-offline} # --wandb works without network; `wandb sync` uploads later
# glibc returns freed blocks over 32 MB to the OS and page-faults them back in on the next step; the stacked
# experts' activations are that large, so keep them (measured on 2 CPU cores: stage 3 8% faster, stage 1 9%).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
