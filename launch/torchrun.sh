#!/usr/bin/env bash
# `pretrain fit` under torchrun: one process per GPU on this node, on one node or several.
#
#   launch/torchrun.sh --config configs/gpt/smoke.yaml [more `pretrain fit` arguments]
#
# Environment (all optional):
#   NPROC         processes on this node (default: the visible GPUs, or 1 without any)
#   NNODES        nodes in the job (default 1), or MIN:MAX for an elastic job (c10d rendezvous only): the job runs
#                 on any number of nodes in that range, restarts every training process when a node leaves or joins,
#                 and each (re)start resumes the run's newest checkpoint (--ckpt_path last is passed; with no
#                 checkpoint yet it starts fresh)
#   MAX_RESTARTS  restarts of the training processes after a failure (torchrun --max-restarts; default 0, elastic 3);
#                 a node leaving or joining does not count
#   NODE_RANK     this node's rank, 0..NNODES-1 (default 0; static rendezvous only)
#   MASTER_ADDR   node 0's address (default 127.0.0.1) } static rendezvous: run the same command on every node
#   MASTER_PORT   a free port on it (default 29500)    } with its own NODE_RANK
#   RDZV_ENDPOINT host:port of a c10d rendezvous (instead of MASTER_*; ranks are assigned, NODE_RANK is not needed)
#   RDZV_ID       the job's rendezvous id (default "pretrain"; unique per job when the endpoint is shared)
#   LOCAL_ADDR    the address the other nodes reach this node at (default: its hostname, which must then resolve to
#                 such an address on every node); the first node's becomes the training processes' MASTER_ADDR
#   RDZV_TIMEOUT  seconds to wait for the rendezvous: for every node to join, and to reach its store (default:
#                 torchrun's, 600 s to join and 60 s to connect); a node that waits longer exits 2 saying why
#   RDZV_CONF     more torchrun --rdzv-conf settings, KEY=VALUE,... (e.g. last_call_timeout=5: seconds an elastic
#                 job waits for more nodes once MIN have joined, torchrun's default 30)
#   PYTHON        the interpreter that has the framework installed (default: python)
# On one node without MASTER_PORT or RDZV_ENDPOINT, torchrun's --standalone picks a free port itself.
#
# The training processes survive the loss of any node only when the rendezvous store is not on a training node: run
# `python -m framework.torchrun --serve-store HOST:PORT` on a host that is not one of them and point RDZV_ENDPOINT
# at it (the store's host itself must not go away: torchrun cannot survive that).
#
# Lightning sees torchrun's environment (TorchElasticEnvironment) and starts no processes of its own; `pretrain fit`
# sets the Trainer's devices and num_nodes from what torchrun started (LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE), at every
# (re)start, overriding any config value.
set -euo pipefail

PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
elastic=0
if [[ $NNODES == *:* ]]; then
    if ! [[ $NNODES =~ ^([1-9][0-9]*):([1-9][0-9]*)$ ]] || (( BASH_REMATCH[1] > BASH_REMATCH[2] )); then
        echo "error: NNODES='$NNODES' is not MIN:MAX with 1 <= MIN <= MAX (e.g. NNODES=2:4)" >&2
        exit 2
    fi
    if [[ -z ${RDZV_ENDPOINT:-} ]]; then
        echo "error: NNODES=$NNODES (elastic) needs a c10d rendezvous: set RDZV_ENDPOINT=host:port, best a host that" \
             "is not a training node (python -m framework.torchrun --serve-store host:port runs one there)" >&2
        exit 2
    fi
    elastic=1
    for arg in "$@"; do
        if [[ $arg == --ckpt_path || $arg == --ckpt_path=* ]]; then
            echo "error: NNODES=$NNODES (elastic) resumes the run's newest checkpoint at every (re)start itself" \
                 "(--ckpt_path last); drop --ckpt_path (to start from other weights: --model.init_args.init_from)" >&2
            exit 2
        fi
    done
fi
if [[ $NNODES != 1 && -z ${RDZV_ENDPOINT:-} && -z ${MASTER_ADDR:-} ]]; then
    echo "error: NNODES=$NNODES needs a rendezvous: set RDZV_ENDPOINT=host:port, or MASTER_ADDR (node 0) and" \
         "NODE_RANK on every node" >&2
    exit 2
fi
if [[ -z ${NPROC:-} ]]; then
    NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)') || {
        echo "error: '$PYTHON' cannot import torch; set PYTHON to the framework's interpreter" >&2
        exit 2
    }
fi

rdzv=()
conf=()
if [[ -n ${RDZV_TIMEOUT:-} ]]; then
    if ! [[ $RDZV_TIMEOUT =~ ^[1-9][0-9]*$ ]]; then
        echo "error: RDZV_TIMEOUT='$RDZV_TIMEOUT' is not a whole number of seconds >= 1" >&2
        exit 2
    fi
    # c10d rendezvous: join_timeout (all nodes in), read_timeout (its store); static (MASTER_*): timeout
    conf=("join_timeout=$RDZV_TIMEOUT" "read_timeout=$RDZV_TIMEOUT" "timeout=$RDZV_TIMEOUT")
fi
if [[ -n ${RDZV_CONF:-} ]]; then
    if ! [[ $RDZV_CONF =~ ^[a-z_]+=[^,=]+(,[a-z_]+=[^,=]+)*$ ]]; then
        echo "error: RDZV_CONF='$RDZV_CONF' is not KEY=VALUE[,KEY=VALUE...] (e.g. last_call_timeout=5)" >&2
        exit 2
    fi
    conf+=("$RDZV_CONF")
fi
if (( ${#conf[@]} )); then
    rdzv=("--rdzv-conf=$(IFS=,; echo "${conf[*]}")")
fi
restarts=${MAX_RESTARTS:-$(( elastic ? 3 : 0 ))}
if ! [[ $restarts =~ ^[0-9]+$ ]]; then
    echo "error: MAX_RESTARTS='$restarts' is not a whole number >= 0" >&2
    exit 2
fi
if [[ -n ${LOCAL_ADDR:-} ]]; then
    rdzv+=("--local-addr=$LOCAL_ADDR")
fi
if [[ -n ${RDZV_ENDPOINT:-} ]]; then
    rdzv+=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=${RDZV_ID:-pretrain}")
elif [[ $NNODES == 1 && -z ${MASTER_PORT:-} ]]; then
    rdzv+=(--standalone)
else
    rdzv+=("--node-rank=${NODE_RANK:-0}" "--master-addr=${MASTER_ADDR:-127.0.0.1}" "--master-port=${MASTER_PORT:-29500}")
fi

fit=()
if (( elastic )); then
    fit=(--ckpt_path last)
    # each round's rank 0 publishes a fresh address for the training processes' process group; torch's shared store
    # (the default) is published only when its host first becomes rank 0, so a node that joins later waits for it
    # in vain (torch 2.13, dynamic_rendezvous.py next_rendezvous)
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    export PRETRAIN_ELASTIC_NNODES=$NNODES  # for fit's check that every world in the range divides the global batch
fi

# framework.torchrun is torchrun (torch.distributed.run) that says a failed rendezvous in one line (exit 2).
# Signals: SIGUSR1 (preemption warning) goes to the training processes, which checkpoint after the current step and
# stop (framework/callbacks/preemption.py); torchrun itself would die of it. SIGTERM/SIGINT go to torchrun, which
# forwards them to the training processes.
"$PYTHON" -m framework.torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC" "${rdzv[@]}" \
    --max-restarts="$restarts" -m framework fit "$@" "${fit[@]}" &
agent=$!
woke=0
trap 'woke=1; pkill -USR1 -P "$agent" || true' USR1
trap 'woke=1; kill -TERM "$agent" 2>/dev/null || true' TERM INT
# a trap runs only once `wait` returns, which a signal makes it do at once; then wait again for the real exit status
while true; do
    wait "$agent" && rc=0 || rc=$?
    if [[ $woke == 1 ]]; then woke=0; continue; fi
    exit "$rc"
done
