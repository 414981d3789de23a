#!/usr/bin/env bash
# Print a .env for docker compose: .env.example with fresh random passwords and S3 keys filled in.
#
#   test -e .env || bash scripts/make-env.sh > .env
#
# Run it once: Postgres and MinIO keep the credentials they were first started with (in their
# volumes), so a new .env for existing volumes locks the service out (the `test -e .env` guard keeps
# the first one). docker-compose.yml has no default for any of these and refuses to start without them.
# Secrets are hex (no character needs escaping in NNM_DATABASE_URL or in a shell).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
example="$here/.env.example"
[[ -f "$example" ]] || { echo "make-env.sh: $example is missing" >&2; exit 1; }

secret() {  # $1 random bytes, as hex
    od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

awk -v pg="$(secret 24)" -v root_user="nnm-root-$(secret 4)" -v root="$(secret 24)" \
    -v s3_user="nnm-service" -v s3="$(secret 24)" -v admin="$(secret 32)" '
BEGIN {
    value["POSTGRES_PASSWORD"] = pg
    value["MINIO_ROOT_USER"] = root_user
    value["MINIO_ROOT_PASSWORD"] = root
    value["NNM_S3_ACCESS_KEY"] = s3_user
    value["NNM_S3_SECRET_KEY"] = s3
    value["NNM_AUTH"] = "required"
    value["NNM_ADMIN_KEY"] = admin
    print "# Written by scripts/make-env.sh. Secrets: never commit this file; back it up with the volumes."
    print ""
}
{
    split($0, kv, "=")
    if ($0 !~ /^#/ && (kv[1] in value)) { print kv[1] "=" value[kv[1]]; seen[kv[1]] = 1 } else print
}
END {
    for (k in value) if (!(k in seen)) { print "make-env.sh: .env.example has no " k > "/dev/stderr"; exit 1 }
}' "$example"
