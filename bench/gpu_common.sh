# Sourced by the GPU scripts: run one capped step and record a failure in $status.
step() {  # step SECONDS NAME COMMAND...  (capped further by what is left of DEADLINE)
    local limit=$1 name=$2
    shift 2
    local left=$((DEADLINE - SECONDS - 5))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 0 ]; then echo "== $name: SKIPPED, deadline reached"; status=1; return; fi
    echo "== $name (limit ${limit}s, at ${SECONDS}s)"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ $rc -eq 0 ] || status=1
}
