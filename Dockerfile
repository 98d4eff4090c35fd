# One image for all five Accessline services; the service is chosen by the command,
# for example `accessline serve routing`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY accessline_server ./accessline_server
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
