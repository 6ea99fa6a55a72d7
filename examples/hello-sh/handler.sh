#!/bin/sh
# A function is any executable. The arguments of `flux-agent invoke hello -- ARGS`
# (or of Flux's ExecutionRequest.args) follow it in argv; stdout and stderr
# are its output, its exit status its exit code.
name=${1:-world}
echo "hello, $name: execution $FLUX_EXECUTION_ID, uid $(id -u), node $FLUX_NODE_PRIVATE_IP"
for step in 1 2 3; do
	sleep 1
	echo "step $step of 3"
done
if [ "$name" = "fail" ]; then
	echo "failing on purpose" >&2
	exit 3
fi
