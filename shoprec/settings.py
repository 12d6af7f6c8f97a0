"""The one typed settings object, read from ``SHOPREC_*`` environment variables.

``shoprec stack up`` writes the endpoints of the stack it started to ``stack.env`` in
its folder (``SHOPREC_STACK_DIR``, ``.shoprec`` by default); that file is read as a
fallback so every later command naming the same folder finds the stack.  Real
environment variables always win over the file.  ``shoprec config`` prints every
setting with its variable, default and meaning (the README table is made from it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shoprec.experiments import Experiment, load_experiment

ENV_PREFIX = "SHOPREC_"
STACK_ENV_NAME = "stack.env"
STACK_ENV_FILE = Path(".shoprec") / STACK_ENV_NAME
"""The stack's endpoints in the default stack folder."""
CACHE_DIR = Path(".shoprec") / "cache"
"""Where the offline tools (train, evaluate, simulate, the benchmarks) keep item MiniLM
vectors and replayed datasets between runs, relative to where they run."""


class Settings(BaseSettings):
    """Everything shoprec can be told; one field per ``SHOPREC_<NAME>`` variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=STACK_ENV_FILE,
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
    )

    # --- where the services are -------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated host:port."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    kafka_sasl_mechanism: str = Field("PLAIN", description="SASL mechanism when SASL is used.")
    kafka_sasl_username: str = Field("", description="SASL user name.")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password.")
    kafka_ssl_cafile: str = Field(
        "",
        description="CA bundle (PEM) that verifies the brokers under SSL or SASL_SSL; "
        "empty trusts the system CAs.",
    )
    kafka_ssl_certfile: str = Field(
        "", description="Client certificate (PEM) for mutual TLS with the brokers; empty: none."
    )
    kafka_ssl_keyfile: str = Field(
        "", description="Private key (PEM) of SHOPREC_KAFKA_SSL_CERTFILE."
    )
    kafka_replication_factor: int = Field(
        1,
        ge=1,
        description="Replicas of each topic shoprec creates (3 on a cluster, with the brokers' "
        "min.insync.replicas=2); at most the number of brokers.",
    )
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL: redis:// or rediss:// (TLS), may carry an ACL user:password; "
        "TLS files as query parameters, e.g. rediss://user:pw@host:6380/0?ssl_ca_certs=ca.pem"
        "&ssl_certfile=client.pem&ssl_keyfile=client.key.",
    )
    redis_cluster: bool = Field(
        False,
        description="Redis is a Redis Cluster: SHOPREC_REDIS_URL names one of its nodes or "
        "several (redis://h1:p1,h2:p2/0; name several, so that a process started while one "
        "node is down still finds the cluster) and the client finds the others.",
    )
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint host:port.")
    triton_timeout_s: float = Field(2.0, gt=0, description="Timeout of one Triton call.")
    triton_breaker_failures: int = Field(
        3,
        ge=1,
        description="Failed Triton calls in a row that open the circuit breaker: while open, "
        "recommendations are served degraded at once, without calling Triton.",
    )
    triton_breaker_cool_down_s: float = Field(
        1.0,
        gt=0,
        description="Wait before an open breaker lets one probe call through; doubles after "
        "each failed probe, up to 16 times this.",
    )
    item_encoder_model: str = Field(
        "item_encoder",
        description="Triton model embedding catalogue text (on a CPU at a lower priority, "
        "so a catalogue load never slows the ranker).",
    )
    query_encoder_model: str = Field(
        "query_encoder", description="Triton model embedding search queries (normal priority)."
    )
    ranker_model: str = Field("fused_ranker", description="Triton model scoring candidates.")

    # --- the Faust app --------------------------------------------------------------
    app_id: str = Field(
        "shoprec", description="Faust app id: consumer group and internal topic prefix."
    )
    topic_prefix: str = Field(
        "", description="Prefix for every topic name (isolates tests and shadow runs)."
    )
    topic_partitions: int = Field(4, ge=1, description="Partitions of topics shoprec creates.")
    batch_max: int = Field(
        128, ge=1, description="Most events handled together (one Redis and Triton round trip)."
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="The worker's event loop; uvloop does the socket work of Kafka, Redis "
        "and Triton calls in C.",
    )
    agent_concurrency: int = Field(
        1,
        ge=1,
        le=16,
        description="Micro-batches one worker handles at once. Above 1, one batch is "
        "ingested while another waits on Triton, but one user's events may be handled out "
        "of order (the embedding tolerates it; history order and co-visitation do not).",
    )
    batch_within_ms: int = Field(
        0,
        ge=0,
        description="How long a batch waits after its first event for more. 0: the agent "
        "gets what has arrived at once; what arrives while it works is the next batch.",
    )
    consumer_thread: bool = Field(
        False,
        description="Run Faust's Kafka consumer in a thread of its own (Faust's way) "
        "instead of on the worker's event loop; the hand-off between threads costs "
        "latency and CPU (docs/benchmarks.md).",
    )
    consumer_fetch_max_wait_ms: int | None = Field(
        None,
        ge=1,
        le=30_000,
        description="Longest a broker may hold a consumer's fetch that has no records. "
        "Unset: 500 on Kafka (which answers as soon as a record arrives), 5 on Tansu "
        "(which holds every fetch for the whole wait).",
    )

    # --- recommendations ------------------------------------------------------------
    top_k: int = Field(10, ge=1, le=100, description="Items per recommendation.")
    n_candidates: int = Field(
        100, ge=10, le=1000, description="Candidates sent to the ranker per user."
    )
    history_len: int = Field(
        50,
        ge=1,
        le=500,
        description="Recent events kept per user (the learner's replay keeps as many).",
    )
    memory_len: int = Field(
        200,
        ge=0,
        le=2000,
        description="Distinct items of each user's whole past kept beside the history, by "
        "a count of their events decayed over 180 days (the weakest go first): the ranker "
        "reads how often a candidate came back. 0 keeps none, and the learner then trains "
        "models that read none.",
    )
    complements_after_purchase: int = Field(
        10,
        ge=0,
        le=100,
        description="After a purchase, up to this many items other customers bought "
        "together with it (co-purchase within 30 days) take turns with the ranker's picks "
        "in the list, the ranker's best first; 0 serves the ranker's list alone. An experiment "
        "arm's own 'complements' overrides it for the arm's users. A version the learner "
        "trained may take none, or order them by its own scores (SHOPREC_LEARNER_COMPLEMENTS).",
    )
    min_emit_interval_ms: int = Field(
        30_000,
        ge=0,
        description="Per-user minimum event-time gap between two emissions "
        "(purchases and searches always emit).",
    )
    embedding_half_life_s: float = Field(
        7 * 86400.0, gt=0, description="Half-life of the rolling user embedding (event time)."
    )
    user_ttl_s: int = Field(
        30 * 86400, ge=60, description="Idle time after which a user's state expires."
    )

    # --- experiments and attribution (docs/experiments.md) ---------------------------
    experiment: Annotated[Experiment | None, NoDecode] = Field(
        None,
        description="The running experiment: JSON or the path of a JSON file with its name, "
        "arms (ranker version, covisitation, retrieval or holdout; shares; shadow arms) and "
        "optional bandit (docs/experiments.md). Unset: one arm, the served ranker.",
    )
    attribution_window_ms: int = Field(
        30 * 60_000,
        ge=0,
        description="A click, cart or purchase of an item a list showed is credited to that "
        "list when it happens within this much event time after the list's trigger "
        "(0 turns attribution and experiments off).",
    )

    # --- privacy and retention ------------------------------------------------------
    topic_retention_s: int = Field(
        14 * 86400,
        ge=3600,
        description="The longest a record stays in the event and dead-letter topics: their "
        "retention.ms plus segment.ms (Kafka deletes a segment once its newest record is past "
        "retention; defaults 7 + 7 days). Not applied to the broker. An erased user's entry "
        "in the suppression list, which keeps replay, rebuild and the worker from applying "
        "their retained events again, and the dead-letter re-injection markers are kept "
        "this long.",
    )
    forget_hash_key: SecretStr = Field(
        SecretStr(""),
        description="Secret key of the keyed hash (BLAKE2b) that names an erased user in the "
        "suppression list (never the raw id). Empty: an unkeyed hash, which anyone who can "
        "read Redis can reverse by hashing candidate ids; set one in production, the same "
        "for every worker and operator, and keep it for SHOPREC_TOPIC_RETENTION_S after the "
        "last erase (a new key no longer recognises older entries).",
    )

    # --- input guards ---------------------------------------------------------------
    max_event_bytes: int = Field(16_384, ge=256, description="Largest accepted event record.")
    max_field_chars: int = Field(512, ge=16, description="Longest accepted id or query.")
    max_future_skew_ms: int = Field(
        5 * 60_000, ge=0, description="How far in the future an event time may be."
    )

    # --- operations -----------------------------------------------------------------
    state_prefix: str = Field(
        "",
        pattern=r"^[^{}\s]*$",
        description="Prefix of every event-derived Redis key (user state, co-visitation, "
        "popularity); empty is the live state. Replays use a shadow prefix.",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the worker's Prometheus endpoint binds to."
    )
    metrics_port: int = Field(
        9108, ge=0, le=65535, description="Port of the worker's Prometheus /metrics (0 = off)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as JSON objects (one per line)."
    )

    # --- pull API (`shoprec serve`) ---------------------------------------------------
    api_host: str = Field(
        "127.0.0.1",
        description="Address the pull API (`shoprec serve`) binds to; 0.0.0.0 only in a "
        "container behind a Service.",
    )
    api_port: int = Field(8080, ge=1, le=65535, description="Port of the pull API (HTTP).")
    api_key: SecretStr = Field(
        SecretStr(""),
        description="When set, every /v1 request must carry it in the X-API-Key header "
        "(compared in constant time, never logged); empty: no key asked.",
    )
    api_rate_limit: float = Field(
        500.0,
        ge=0,
        description="Requests per second one client address may make to /v1 (a token bucket "
        "per address, in each API process); above it 429 with Retry-After. 0: no limit.",
    )
    api_rate_burst: int = Field(
        1000,
        ge=1,
        description="Requests one client address may make at once before "
        "SHOPREC_API_RATE_LIMIT applies (the bucket's size).",
    )

    # --- learning (`shoprec learner`, `shoprec train --from-topics`) ------------------
    model_repo: Path = Field(
        Path("model_repo"),
        description="Triton's model repository. Only promoted ranker versions are moved in: "
        "Triton serves the newest version folder it finds.",
    )
    model_archive: Path = Field(
        Path(".shoprec/model_archive"),
        description="Where candidate and retired ranker versions are kept, outside the served "
        "repository (never served unless promoted).",
    )
    learner_every_s: float = Field(
        3600.0, ge=0, description="The learner retrains at least this often (0 = only on events)."
    )
    learner_every_events: int = Field(
        50_000,
        ge=0,
        description="The learner also retrains after this many new input events (0 = only "
        "on schedule).",
    )
    learner_window_s: int = Field(
        0,
        ge=0,
        description="How far back from now the learner reads the topics, by record time (when "
        "each event was produced); 0 = every retained event.",
    )
    learner_margin: float = Field(
        0.01,
        ge=0,
        description="A candidate replaces the live ranker (the shipped one, another shop's "
        "or this shop's own) when the 95% bootstrap interval of its held-out NDCG@10 gain "
        "lies above this share of the live NDCG@10, and never when it scores lower; see "
        "SHOPREC_LEARNER_REFRESH for the shop's own earlier round.  A cold shop's untrained "
        "baselines replace another shop's ranker (the shipped one included) when no lower "
        "on either held-out slice.",
    )
    learner_refresh: bool = Field(
        True,
        description="A candidate also replaces the live ranker when the live one is this "
        "shop's own earlier round and the candidate scores no lower on either held-out slice "
        "(the next basket and the next event): the same recipe on newer events. False: only "
        "a confident gain (SHOPREC_LEARNER_MARGIN) promotes.",
    )
    learner_complements: bool = Field(
        True,
        description="The learner chooses for each version it trains whether its lists take "
        "complements after a purchase, and in which order: on the shop's held-out events, "
        "the order (co-purchase or the version's own scores) that gives the next event after "
        "a purchase the higher NDCG@10, and none where even that order lowers it with 95% "
        "confidence, otherwise SHOPREC_COMPLEMENTS_AFTER_PURCHASE. The version serves its "
        "choice to every arm (an arm's own 'complements' only lowers the number). False: "
        "every version takes what each request carries, in co-purchase order.",
    )
    learner_min_events: int = Field(
        200, ge=1, description="The learner waits for this many events before it trains at all."
    )

    # --- local stack ----------------------------------------------------------------
    stack_dir: Path = Field(
        Path(".shoprec"), description="Where `shoprec stack` keeps data, logs and pids."
    )
    broker: Literal["kafka", "tansu"] = Field(
        "kafka", description="Broker `shoprec stack up` starts: Apache Kafka or Tansu."
    )
    kafka_port: int = Field(9092, ge=0, le=65535, description="Local broker port (0 = free).")
    redis_port: int = Field(6379, ge=0, le=65535, description="Local Redis port (0 = free).")
    triton_http_port: int = Field(8000, ge=0, le=65535, description="Triton HTTP (0 = free).")
    triton_grpc_port: int = Field(8001, ge=0, le=65535, description="Triton gRPC (0 = free).")
    triton_metrics_port: int = Field(
        8002, ge=0, le=65535, description="Triton metrics port (0 = free)."
    )
    kafka_heap: str = Field("512m", description="JVM heap of the local Apache Kafka broker.")

    @field_validator("experiment", mode="before")
    @classmethod
    def _experiment(cls, value: object) -> Experiment | None:
        return load_experiment(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Read the stack's ``stack.env`` from the stack folder the caller names
        (``stack_dir=`` or ``SHOPREC_STACK_DIR``; the folder cannot come from the file it
        holds), unless ``_env_file=`` names another file."""
        if (
            isinstance(dotenv_settings, DotEnvSettingsSource)
            and dotenv_settings.env_file == STACK_ENV_FILE
        ):
            kwargs = getattr(init_settings, "init_kwargs", {})
            folder = kwargs.get("stack_dir") or os.environ.get(f"{ENV_PREFIX}STACK_DIR")
            if folder:
                dotenv_settings = DotEnvSettingsSource(
                    settings_cls,
                    env_file=Path(folder).expanduser() / STACK_ENV_NAME,
                    env_file_encoding="utf-8",
                )
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    def topic(self, name: str) -> str:
        """The full name of one of shoprec's topics."""
        return f"{self.topic_prefix}{name}"

    def as_env(self) -> dict[str, str]:
        """These settings as ``SHOPREC_*`` variables, for a child process (secrets included)."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue  # unset stays unset ("None" would not parse back)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, BaseModel):
                value = value.model_dump_json()
            env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return env

    @property
    def fetch_max_wait_ms(self) -> int:
        """``consumer_fetch_max_wait_ms``, or the default that suits the broker."""
        if self.consumer_fetch_max_wait_ms is not None:
            return self.consumer_fetch_max_wait_ms
        return 5 if self.broker == "tansu" else 500

    @property
    def faust_broker(self) -> str:
        """Bootstrap servers in Faust's URL form."""
        return ";".join(f"kafka://{hp.strip()}" for hp in self.kafka_bootstrap.split(","))


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
