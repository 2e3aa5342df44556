# A stand-in for postgres:17-alpine where no registry is reachable (see deploy/smoke-base.sh):
# Debian's postgresql-15 with an entrypoint that honours the official image's variables.
ARG PG_BASE_IMAGE=hashmesh-smoke/postgres-base:15
FROM ${PG_BASE_IMAGE}
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
