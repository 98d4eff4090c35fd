# One image for all five Accessline services; the service is chosen by the command,
# for example `accessline serve routing`.
# The agent console (TypeScript, bundled by esbuild) Presence serves at /console/.
FROM node:20-slim AS console
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm install --no-audit --no-fund --loglevel=error
COPY console ./console
RUN node console/build.mjs

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY accessline_server ./accessline_server
COPY --from=console /src/accessline_server/presence/console ./accessline_server/presence/console
COPY gen ./gen
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin accessline
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
EXPOSE 50051 50052 50053 50054 50055
ENTRYPOINT ["accessline"]
CMD ["serve", "routing"]
