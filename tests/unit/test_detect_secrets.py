"""The secrets detector: token formats with exact spans, masked evidence, false-positive traps, bounds.

Secret-looking values are generated here (deterministic pseudo-random strings and concatenation) so the
file holds no literal key that other scanners would report.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import string
import time

import pytest
import re2

from ztai.detect.base import Detector, Finding
from ztai.detect.secret_rules import load_rules, read_rule_file
from ztai.detect.secrets import SECRET_TYPES, SecretsDetector

ALNUM = string.ascii_letters + string.digits
LOWER_HEX = "0123456789abcdef"
UPPER_NUM = string.ascii_uppercase + string.digits
B64 = ALNUM + "+/"
URLSAFE = ALNUM + "-_"


def rand(n: int, alphabet: str = ALNUM, seed: int = 0) -> str:
    rng = random.Random(f"{seed}:{n}:{alphabet}")
    return "".join(rng.choice(alphabet) for _ in range(n))


def b64url_json(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


JWT = ".".join(
    [
        b64url_json({"alg": "HS256", "typ": "JWT"}),
        b64url_json({"sub": "user-42", "iat": 1700000000}),
        rand(43, URLSAFE, 1),
    ]
)
PEM_BODY = "\n".join(rand(64, B64, i) for i in range(4))
PEM = "-----BEGIN RSA " + "PRIVATE KEY-----\n" + PEM_BODY + "\n-----END RSA " + "PRIVATE KEY-----"
PUTTY = "\n".join(
    [
        "PuTTY-User-Key-File-2: ssh-rsa",
        "Encryption: none",
        "Comment: deploy",
        "Public-Lines: 2",
        rand(64, B64, 200),
        rand(40, B64, 201),
        "Private-Lines: 2",
        rand(64, B64, 202),
        rand(40, B64, 203),
        "Private-MAC: " + rand(40, LOWER_HEX, 204),
    ]
)
OPENSSH = "-----BEGIN OPENSSH " + "PRIVATE KEY-----\n" + PEM_BODY + "\n-----END OPENSSH " + "PRIVATE KEY-----"

# (expected type, text before, the secret, text after)
POSITIVES: list[tuple[str, str, str, str]] = [
    ("AWS_ACCESS_KEY", "export AWS_ACCESS_KEY_ID=", "AKIA" + rand(16, UPPER_NUM, 2), "\n"),
    ("AWS_ACCESS_KEY", '{"AccessKeyId": "', "ASIA" + rand(16, UPPER_NUM, 3), '"}'),
    ("AWS_SECRET_KEY", 'aws_secret_access_key = "', rand(40, B64, 4), '"'),
    ("GCP_API_KEY", "https://maps.googleapis.com/maps/api/js?key=", "AIza" + rand(35, URLSAFE, 5), "&v=3"),
    ("GCP_OAUTH_SECRET", "client_secret: ", "GOCSPX-" + rand(28, URLSAFE, 6), ""),
    ("GCP_SERVICE_ACCOUNT", '{"type": "service_account", "private_key_id": "', rand(40, LOWER_HEX, 7), '"}'),
    (
        "AZURE_STORAGE_KEY",
        "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=",
        rand(86, B64, 8) + "==",
        ";",
    ),
    (
        "AZURE_CONNECTION_STRING",
        "Endpoint=sb://acme.servicebus.windows.net/;SharedAccessKey=",
        rand(43, B64, 9) + "=",
        "",
    ),
    (
        "AZURE_SAS_TOKEN",
        "https://acme.blob.core.windows.net/c?sv=2022-11-02&ss=b&sp=r&sig=",
        rand(43, ALNUM, 10) + "%3D",
        "",
    ),
    ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_SECRET=", rand(3, ALNUM, 11) + "8Q~" + rand(34, ALNUM, 12), ""),
    ("GITHUB_TOKEN", "git clone https://", "ghp_" + rand(36, ALNUM, 13), "@github.com/acme/app.git"),
    ("GITHUB_TOKEN", "GH_TOKEN=", "github_pat_" + rand(22, ALNUM, 14) + "_" + rand(59, ALNUM, 15), ""),
    ("GITLAB_TOKEN", "PRIVATE-TOKEN: ", "glpat-" + rand(20, URLSAFE, 16), ""),
    (
        "SLACK_TOKEN",
        "SLACK_BOT_TOKEN=",
        "xoxb-" + rand(11, string.digits, 17) + "-" + rand(24, ALNUM, 18),
        "",
    ),
    (
        "SLACK_WEBHOOK",
        "url: https://hooks.slack.com/",
        "services/T" + rand(8, UPPER_NUM, 19) + "/B" + rand(8, UPPER_NUM, 20) + "/" + rand(24, ALNUM, 21),
        "",
    ),
    ("STRIPE_KEY", "stripe.api_key = '", "sk_" + "live_" + rand(24, ALNUM, 22), "'"),
    (
        "OPENAI_API_KEY",
        "OPENAI_API_KEY=",
        "sk-proj-" + rand(20, ALNUM, 23) + "T3BlbkFJ" + rand(20, ALNUM, 24),
        "",
    ),
    ("ANTHROPIC_API_KEY", "x-api-key: ", "sk-ant-api03-" + rand(93, URLSAFE, 25) + "AA", ""),
    ("HUGGINGFACE_TOKEN", "HF_TOKEN=", "hf_" + rand(34, string.ascii_letters, 26), ""),
    ("TWILIO_KEY", "API_SID=", "SK" + rand(32, LOWER_HEX, 27), ""),
    ("SENDGRID_KEY", "SENDGRID_API_KEY=", "SG." + rand(22, URLSAFE, 28) + "." + rand(43, URLSAFE, 29), ""),
    ("MAILCHIMP_KEY", "mailchimp: ", rand(32, LOWER_HEX, 30) + "-us14", ""),
    ("NPM_TOKEN", "//registry.npmjs.org/:_authToken=", "npm_" + rand(36, ALNUM, 31), ""),
    ("NPM_TOKEN", "//npm.acme.dev/repo/:_authToken=", rand(40, B64, 32), ""),
    ("PYPI_TOKEN", "password = ", "pypi-AgEIcHlwaS5vcmc" + rand(120, URLSAFE, 33), ""),
    (
        "DISCORD_TOKEN",
        "DISCORD_TOKEN=",
        "M" + rand(25, URLSAFE, 34) + "." + rand(6, URLSAFE, 35) + "." + rand(38, URLSAFE, 36),
        "",
    ),
    (
        "TELEGRAM_TOKEN",
        "https://api.telegram.org/bot",
        rand(10, string.digits, 37) + ":AA" + rand(33, URLSAFE, 38),
        "/getMe",
    ),
    ("ARTIFACTORY_TOKEN", "X-JFrog-Art-Api: ", "AKCp" + rand(69, ALNUM, 39), ""),
    ("IBM_CLOUD_IAM_KEY", "ibm_cloud_api_key: ", rand(44, URLSAFE, 40), ""),
    ("IBM_COS_HMAC_KEY", "cos_hmac_secret_access_key = '", rand(48, LOWER_HEX, 41), "'"),
    ("SOFTLAYER_API_KEY", "--softlayer-api-key ", rand(64, string.ascii_lowercase + string.digits, 42), ""),
    ("BASIC_AUTH_URL", "DATABASE_URL=postgres://app:", rand(16, ALNUM, 43), "@db.internal:5432/app"),
    ("BASIC_AUTH_URL", "redis://:", rand(12, ALNUM, 44), "@cache:6379/0"),
    (
        "AUTHORIZATION_HEADER",
        "Authorization: Basic ",
        base64.b64encode(b"alice:" + rand(12, ALNUM, 45).encode()).decode(),
        "",
    ),
    (
        "AUTHORIZATION_HEADER",
        "curl -H 'Authorization: Bearer ",
        rand(40, ALNUM, 46),
        "' https://api.acme.dev",
    ),
    ("JWT", "Cookie: session=", JWT, "; Path=/"),
    ("PRIVATE_KEY", "key file:\n", PEM, "\nend"),
    ("PRIVATE_KEY", "", OPENSSH, ""),
    ("PRIVATE_KEY", "deploy.ppk:\n", PUTTY, "\n"),
    ("SQUARE_KEY", "SQUARE_APP_SECRET=", "sq0csp-" + rand(43, URLSAFE, 62), ""),
    ("PASSWORD_ASSIGNMENT", 'val password: String = "', rand(14, ALNUM, 63), '"'),
    (
        "NET_CONNECTION_STRING_WITH_PASSWORD",
        "Server=db;User Id=sa;Password=",
        rand(14, ALNUM, 64),
        ";Encrypt=true",
    ),
    ("PASSWORD_ASSIGNMENT", "DB_PASSWORD=", "Qz7#" + rand(8, ALNUM, 47), "\n"),
    ("PASSWORD_ASSIGNMENT", '{"user": "svc", "password": "', rand(14, ALNUM, 48), '"}'),
    ("PASSWORD_ASSIGNMENT", "password: '", "Tr0ub4dor&" + rand(3, string.digits, 49), "'"),
    ("PASSWORD_ASSIGNMENT", 'if (secret == "', rand(18, ALNUM + "!@#", 50), '") {'),
    ("PASSWORD_ASSIGNMENT", 'if ("', rand(18, ALNUM + "!@#", 51), '" !== db_pass) {'),
    ("PASSWORD_ASSIGNMENT", "conn.password := `", rand(12, ALNUM, 52), "`"),
    ("PASSWORD_ASSIGNMENT", 'std::string secret("', rand(16, ALNUM, 53), '");'),
    ("PASSWORD_ASSIGNMENT", "<password>", rand(12, ALNUM, 54), "</password>"),
    ("PASSWORD_ASSIGNMENT", "my password is ", "correct-horse-" + rand(6, string.digits, 55), " btw"),
    ("PASSWORD_ASSIGNMENT", 'client_secret => "', rand(24, ALNUM, 56), '"'),
    ("PASSWORD_ASSIGNMENT", "GET /v1/items?api_key=", rand(24, ALNUM, 57), "&format=json"),
    ("PASSWORD_ASSIGNMENT", "The API key is ", rand(32, ALNUM, 58), " for staging."),
    ("PASSWORD_ASSIGNMENT", 'mysql --password="', rand(12, ALNUM, 59), '" -h db'),
    ("HIGH_ENTROPY_STRING", 'cloudant_key = "', rand(32, ALNUM, 60), '"'),
    ("HIGH_ENTROPY_STRING", "here is my token for the CI ", rand(32, ALNUM, 61), " thanks"),
]


@pytest.fixture(scope="module")
def detector() -> SecretsDetector:
    return SecretsDetector()


def test_every_reported_type_is_tested() -> None:
    # ztai's own formats here; the vendored rules' types by their upstream examples (below)
    assert {kind for kind, *_ in POSITIVES} <= set(SECRET_TYPES)


def test_implements_the_detector_protocol(detector: SecretsDetector) -> None:
    assert isinstance(detector, Detector)
    assert detector.name == "secrets"
    assert detector.scan("", "user") == []


@pytest.mark.parametrize(("kind", "before", "secret", "after"), POSITIVES, ids=[p[0] for p in POSITIVES])
def test_detects_each_type_with_exact_span(
    detector: SecretsDetector, kind: str, before: str, secret: str, after: str
) -> None:
    text = before + secret + after
    findings = detector.scan(text, "user")
    assert [(f.type, f.start, f.end) for f in findings] == [(kind, len(before), len(before) + len(secret))]
    finding = findings[0]
    assert text[finding.start : finding.end] == secret
    assert finding.detector == "secrets"
    assert 0.0 < finding.score <= 1.0


@pytest.mark.parametrize(("kind", "before", "secret", "after"), POSITIVES, ids=[p[0] for p in POSITIVES])
def test_evidence_is_masked(
    detector: SecretsDetector, kind: str, before: str, secret: str, after: str
) -> None:
    (finding,) = detector.scan(before + secret + after, "model_output")
    assert secret not in finding.evidence
    assert "…" in finding.evidence
    rule, _, preview = finding.evidence.partition(": ")
    assert rule and preview
    shown = preview.split(" (")[0].replace("…", "")
    assert len(shown) <= max(8, len(secret) // 5 * 2)  # at most a fifth of the value at each end


def test_structured_tokens_score_higher_than_heuristics(detector: SecretsDetector) -> None:
    structured = detector.scan("ghp_" + rand(36, ALNUM, 70), "user")[0]
    assignment = detector.scan("password = '" + rand(12, ALNUM, 71) + "!'", "user")[0]
    entropy = detector.scan("here is my token: " + rand(32, ALNUM, 72), "user")[0]
    assert structured.score == 1.0
    assert 0.5 <= entropy.score < assignment.score < structured.score


FALSE_POSITIVE_TRAPS = [
    'password = os.environ["DB_PASSWORD"]',
    "password = os.getenv('DB_PASSWORD')",
    "api_key = settings.OPENAI_API_KEY",
    "const apiKey = process.env.OPENAI_API_KEY;",
    "API_KEY=${OPENAI_API_KEY}",
    'token: "{{ secrets.GITHUB_TOKEN }}"',
    "secret: ${{ secrets.DEPLOY_KEY }}",
    "password: <your-password-here>",
    'api_key = "<your-api-key>"',
    'SECRET_KEY = "changeme"',
    'password = "xxxxxxxx"',
    'password="********"',
    'aws_secret_access_key = "YOUR_SECRET_ACCESS_KEY"',
    'api_key = "sk-..."',
    "password = None",
    'password = ""',
    "api_key: null",
    "password=$DB_PASS",
    'password = "%(password)s"',
    "UPDATE users SET password = :password WHERE id = :id",
    "password: !vault |",
    "def login(username: str, password: str) -> bool:",
    '"password": {"type": "string", "minLength": 8}',
    "password = generate_password(length=16)",
    "self.password = password",
    "passwd = Zk9x2mQ7vL;",
    "if password == confirm_password:",
    'secret_name = "prod/db/credentials"',
    'password_file = "/run/secrets/db_password"',
    'token_url = "https://oauth2.googleapis.com/token"',
    '"max_tokens": 4096, "temperature": 0.2',
    'eos_token = "</s>"',
    'pad_token: "<|endoftext|>"',
    'tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")',
    'request_id = "3f2b1c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"',
    "commit " + rand(40, LOWER_HEX, 80),
    "sha256: " + rand(64, LOWER_HEX, 81),
    'checksum = "' + rand(32, LOWER_HEX, 82) + '"',
    'public_key = "' + rand(88, B64, 83) + '"',
    'sort_key = "created_at"',
    'next_page_token = "' + rand(24, ALNUM, 84) + '"',
    '"password_hash": "$2b$12$' + rand(53, ALNUM, 85) + '"',
    'some_key = "real_secret"',
    "password: real_key",
    'secret_sauce = "ketchup-and-mayo"',
    "Your password must be at least 8 characters long.",
    "Forgot your password? Click here to reset it.",
    "The token limit for this model is 128k tokens.",
    "Please enter your API key in the settings page.",
    "The secretary said the password policy requires rotation every 90 days.",
    "Bearer tokens are described in RFC 6750 for OAuth clients.",
    "Authorization: Bearer ${TOKEN}",
    "https://user@example.com/path",
    "https://example.com:8443/api",
    '"https://url:8000";@something else',
    "git@github.com:org/repo.git",
    '<img src="data:image/png;base64,' + rand(120, B64, 86) + '==">',
    "foo_" + rand(36, ALNUM, 87),
    "sk_" + "test_",
    "pk_" + "live_" + rand(24, ALNUM, 88),
    "akia" + rand(16, string.ascii_lowercase, 89),
    "eyJhbGciOiJIUzI1NiJ9",
    "eyJ" + rand(30, URLSAFE, 90) + "." + rand(30, URLSAFE, 91) + "." + rand(30, URLSAFE, 92),
    "testAKCwithinsomelongerword",
    rand(8, string.digits, 93) + ":AB" + rand(33, URLSAFE, 94),
]


@pytest.mark.parametrize("text", FALSE_POSITIVE_TRAPS)
def test_false_positive_traps_are_not_flagged(detector: SecretsDetector, text: str) -> None:
    assert detector.scan(text, "document") == []


PLACEHOLDER_TOKENS = [
    "AKIA" + "X" * 16,
    "AKIA" + "IOSFODNN7" + "EXAMPLE",
    "ghp_" + "x" * 36,
    "sk_" + "live_" + "x" * 24,
    "https://username:password@example.com",
    'if line.startswith("-----BEGIN RSA ' + 'PRIVATE KEY-----"):',
]


@pytest.mark.parametrize("text", PLACEHOLDER_TOKENS)
def test_placeholder_bodies_in_token_formats_score_low(detector: SecretsDetector, text: str) -> None:
    findings = detector.scan(text, "document")
    assert findings, "a well-formed token is still reported"
    assert all(f.score < 0.5 and "placeholder-like" in f.evidence for f in findings)
    assert SecretsDetector(min_score=0.5).scan(text, "document") == []


def test_offsets_are_code_points_after_multibyte_text(detector: SecretsDetector) -> None:
    secret = "ghp_" + rand(36, ALNUM, 100)
    text = "🔑 пароль — 秘密: " + secret + " ✓"
    (finding,) = detector.scan(text, "user")
    assert text[finding.start : finding.end] == secret
    value = "Zq9!" + rand(10, ALNUM, 101)
    text = "数据库 😀😀 password = '" + value + "' — ok"
    (finding,) = detector.scan(text, "user")
    assert text[finding.start : finding.end] == value


def test_unicode_password_value(detector: SecretsDetector) -> None:
    text = "contraseña = 'ñandú-Пароль-2024'"
    findings = detector.scan(text, "user")
    assert [text[f.start : f.end] for f in findings] == ["ñandú-Пароль-2024"]


def test_several_secrets_in_a_document_sorted_and_disjoint(detector: SecretsDetector) -> None:
    aws = "AKIA" + rand(16, UPPER_NUM, 110)
    gh = "ghp_" + rand(36, ALNUM, 111)
    pw = "Vb7$" + rand(10, ALNUM, 112)
    text = f"config:\n  aws_key: {aws}\n  github_token: {gh}\n  db_password: '{pw}'\n\n{PEM}\n"
    findings = detector.scan(text, "document")
    assert [text[f.start : f.end] for f in findings] == [aws, gh, pw, PEM]
    assert [f.type for f in findings] == [
        "AWS_ACCESS_KEY",
        "GITHUB_TOKEN",
        "PASSWORD_ASSIGNMENT",
        "PRIVATE_KEY",
    ]
    assert all(a.end <= b.start for a, b in itertools.pairwise(findings))


def test_private_key_inside_json_with_escaped_newlines(detector: SecretsDetector) -> None:
    pem = PEM.replace("\n", "\\n")
    text = '{"type": "service_account", "private_key": "' + pem + '\\n", "client_email": "a@b.iam"}'
    findings = detector.scan(text, "tool_output")
    assert [(f.type, text[f.start : f.end]) for f in findings] == [("PRIVATE_KEY", pem)]


def test_truncated_private_key_still_reported(detector: SecretsDetector) -> None:
    text = "-----BEGIN EC " + "PRIVATE KEY-----\n" + PEM_BODY[:130]
    (finding,) = detector.scan(text, "model_output")
    assert finding.type == "PRIVATE_KEY"
    assert finding.start == 0 and finding.end == len(text)
    assert finding.score >= 0.5


def test_nested_and_unbalanced_quotes(detector: SecretsDetector) -> None:
    value = "a'b`c" + rand(10, ALNUM, 120)
    text = f'password = "{value}"'
    (finding,) = detector.scan(text, "user")
    assert text[finding.start : finding.end] == value
    escaped = 'password = "ab\\"' + rand(10, ALNUM, 121) + '"'
    (finding,) = detector.scan(escaped, "user")
    assert escaped[finding.end] == '"' and escaped[finding.start - 1] == '"'
    assert detector.scan("private_key \"hopenobodyfindsthisone';", "user") == []
    assert detector.scan("password = \"'`\"'`" * 50, "user") == []


@pytest.mark.parametrize(
    "text",
    [
        "a" * 1_000_000,
        "A" * 1_000_000,
        " " * 1_000_000,
        "\n" * 1_000_000,
        '"' * 1_000_000,
        "AKC" + "b" * 1_000_000 + "_",
        "eyJhbGciOiJIUzI1NiJ9." * 40_000,
        "https://" * 100_000,
        "-----BEGIN RSA " + "PRIVATE KEY-----\n" + "A" * 1_000_000,
        "M" * 24 + "." * 1_000_000,
        "password=" * 100_000,
        "🔑пароль" * 100_000,
        "\u202e\u200b\ufeff\x00\ud800" * 100_000,
    ],
    ids=lambda t: repr(t[:12]),
)
def test_huge_and_odd_inputs_are_fast_and_safe(detector: SecretsDetector, text: str) -> None:
    started = time.perf_counter()
    findings = detector.scan(text, "document")
    assert time.perf_counter() - started < 2.0
    assert all(isinstance(f, Finding) and 0 <= f.start < f.end <= len(text) for f in findings)


def test_keyword_floods_stay_linear(detector: SecretsDetector) -> None:
    small = "api key sl_key password: " * 2_000
    large = small * 8
    t0 = time.perf_counter()
    detector.scan(small, "document")
    t_small = time.perf_counter() - t0
    t0 = time.perf_counter()
    detector.scan(large, "document")
    t_large = time.perf_counter() - t0
    assert t_large < max(0.5, 20 * t_small)


def test_many_secrets_are_all_reported(detector: SecretsDetector) -> None:
    lines = [f"token_{i} = '{rand(24, ALNUM, 1000 + i)}'" for i in range(500)]
    findings = detector.scan("\n".join(lines), "document")
    assert len(findings) == 500


# -- vendored rules (kingfisher) ------------------------------------------------------------------------


def test_vendored_rule_file_loads_and_every_rule_compiles() -> None:
    doc = read_rule_file()
    assert "kingfisher" in doc["upstream"]
    assert len(doc["rules"]) > 1000
    for entry in doc["rules"]:
        re2.compile(entry["pattern"])  # raises if a rule does not compile
        assert entry["type"] == entry["type"].upper() and " " not in entry["type"]
    assert all(s["reason"] for s in doc["skipped"])
    assert len(load_rules()) > 850


def _reported_examples() -> list[tuple[str, str]]:
    rules = load_rules()
    return [(rule.id, example) for rule in rules.rules for example in rule.examples]


def test_vendored_rule_examples_fire(detector: SecretsDetector) -> None:
    """Every reported rule's own upstream examples are flagged (by that rule or a stronger overlapping one)."""
    examples = _reported_examples()
    assert len(examples) > 1000
    missed = [(rule_id, ex[:60]) for rule_id, ex in examples if not detector.scan(ex, "document")]
    assert len(missed) <= 0.02 * len(examples), missed[:20]


def test_vendored_rule_fires_with_the_secret_as_span(detector: SecretsDetector) -> None:
    token = "glpat-" + rand(20, URLSAFE, 900)
    text = f'GITLAB_TOKEN="{token}" # deploy'
    findings = detector.scan(text, "document")
    assert [(f.type, text[f.start : f.end]) for f in findings] == [("GITLAB_TOKEN", token)]
    assert token not in findings[0].evidence
    assert findings[0].evidence.startswith("kingfisher.gitlab.")


def test_vendored_negative_examples_do_not_fire_their_rule(detector: SecretsDetector) -> None:
    rules = load_rules()
    for rule in rules.rules:
        for negative in rule.negative_examples:
            assert all(f.evidence.split(":", 1)[0] != rule.id for f in detector.scan(negative, "document"))


def test_hidden_and_non_secret_rules_are_not_reported(detector: SecretsDetector) -> None:
    ids = {rule.id for rule in load_rules().rules}
    assert "kingfisher.aws.1" in ids  # hidden upstream, a credential for ztai
    assert "kingfisher.stripe.1" not in ids  # publishable keys are public
    assert not any(rule_id.startswith("kingfisher.pwhash.") for rule_id in ids)


@pytest.mark.parametrize(
    "text",
    [
        "a" * 100_000,
        "=" * 100_000,
        "-" * 100_000,
        "key=" * 25_000,
        "twitter key " + "A" * 100_000,
        "ghp_" * 25_000,
        "AKIA" * 25_000,
        "-----BEGIN " * 10_000,
        "password: " + "x1" * 50_000,
        "sk-" + "T3BlbkFJ" * 12_000,
        "xoxb-" + "1-" * 50_000,
    ],
    ids=lambda t: repr(t[:10]),
)
def test_adversarial_inputs_finish_fast(detector: SecretsDetector, text: str) -> None:
    started = time.perf_counter()
    detector.scan(text, "document")
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "text",
    [
        'headers = {"Authorization": f"Bearer {API_KEY}"}',
        'To run `Trio`, pass `backend="trio"`.',
        "Always pass `--endpoint-url` when targeting R2.",
        '"key_competencies": ["planning", "review"]',
        "**What Changed:** ${key_improvements}",
    ],
)
def test_benign_prompt_and_doc_phrases_are_not_secrets(detector: SecretsDetector, text: str) -> None:
    assert detector.scan(text, "document") == []


def test_multi_group_rule_span_covers_the_password(detector: SecretsDetector) -> None:
    password = rand(12, ALNUM, 901)
    text = f"machine build.internal login deployer password {password}\n"
    findings = detector.scan(text, "document")
    assert findings and any(f.start <= text.index(password) and f.end >= len(text) - 1 for f in findings)
    assert all(password not in f.evidence for f in findings)
