#!/bin/sh
# The MLflow tracking server of docker/compose.yaml: PostgreSQL backend, artifacts served
# through the server, basic-auth with the admin account from the environment. The auth
# config is written at start-up inside the container, so no credential is in a file of
# the repository or on the command line.
set -eu
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:?}"
: "${MLFLOW_TRACKING_USERNAME:?}" "${MLFLOW_TRACKING_PASSWORD:?}"
mkdir -p /auth
umask 077
cat > /auth/basic_auth.ini <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:////auth/basic_auth.db
admin_username = ${MLFLOW_TRACKING_USERNAME}
admin_password = ${MLFLOW_TRACKING_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH=/auth/basic_auth.ini
# mlflow reads the store's URL (with its password) from the environment: not in `ps`
export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/${POSTGRES_DB}"
exec mlflow server \
    --artifacts-destination /mlartifacts \
    --serve-artifacts \
    --app-name basic-auth \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow:5000,localhost:5000,127.0.0.1:5000}" \
    --host 0.0.0.0 \
    --port 5000
