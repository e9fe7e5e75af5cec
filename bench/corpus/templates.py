"""Where positives live: realistic snippets (config files, code, shell, logs, chat) with slots.

A template is plain text with ``{SLOT}`` markers. Upper-case slots are *labelled* values: the slot
name up to an optional ``__variant`` suffix is the detector type (``{EMAIL}``, ``{EMAIL__2}`` for
a second address, ``{PRIVATE_KEY__escaped}`` for a key written with ``\\n`` escapes). Lower-case
slots are unlabelled filler (names, hosts, regions...). Any other brace is literal text, so JSON
and code need no escaping. The same slot name gets the same value within one document.
"""

from __future__ import annotations

import json
import random
import string

import re2

from bench.corpus import fakes

SLOT = re2.compile(r"\{([A-Za-z][A-Za-z0-9_]*)\}")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "AWS_ACCESS_KEY": (
        "botocore.exceptions.ClientError: InvalidAccessKeyId: The AWS Access Key Id you provided ({AWS_ACCESS_KEY}) does not exist in our records.\n",
        "ENV AWS_ACCESS_KEY_ID={AWS_ACCESS_KEY} AWS_SECRET_ACCESS_KEY={AWS_SECRET_KEY}\n",
        "[default]\naws_access_key_id = {AWS_ACCESS_KEY}\naws_secret_access_key = {AWS_SECRET_KEY}\nregion = {region}\n",
        "export AWS_ACCESS_KEY_ID={AWS_ACCESS_KEY}\nexport AWS_SECRET_ACCESS_KEY={AWS_SECRET_KEY}\nexport AWS_DEFAULT_REGION={region}\n",
        's3 = boto3.client(\n    "s3",\n    region_name="{region}",\n    aws_access_key_id="{AWS_ACCESS_KEY}",\n    aws_secret_access_key="{AWS_SECRET_KEY}",\n)\n',
        '{\n  "AccessKey": {\n    "UserName": "{user}",\n    "AccessKeyId": "{AWS_ACCESS_KEY}",\n    "Status": "Active",\n    "SecretAccessKey": "{AWS_SECRET_KEY}",\n    "CreateDate": "{date}T10:15:32Z"\n  }\n}\n',
        "Our CI job fails with AccessDenied on s3:PutObject. It runs as {user} with access key {AWS_ACCESS_KEY}. Which policy is missing?",
        'provider "aws" {\n  region     = "{region}"\n  access_key = "{AWS_ACCESS_KEY}"\n  secret_key = "{AWS_SECRET_KEY}"\n}\n',
        "env:\n  AWS_ACCESS_KEY_ID: {AWS_ACCESS_KEY}\n  AWS_REGION: {region}\n",
        "$ aws configure set aws_access_key_id {AWS_ACCESS_KEY}\n$ aws s3 ls s3://{bucket}/\n",
    ),
    "AWS_SECRET_KEY": (
        "my aws secret access key is {AWS_SECRET_KEY} and it stopped working after the rotation, why?",
        "AWS_SECRET_ACCESS_KEY={AWS_SECRET_KEY}\nAWS_ACCESS_KEY_ID={AWS_ACCESS_KEY}\n",
        "const client = new S3Client({\n  region: '{region}',\n  credentials: { accessKeyId: '{AWS_ACCESS_KEY}', secretAccessKey: '{AWS_SECRET_KEY}' },\n});\n",
        "[profile {user}]\naws_access_key_id={AWS_ACCESS_KEY}\naws_secret_access_key={AWS_SECRET_KEY}\n",
        "spark.hadoop.fs.s3a.access.key {AWS_ACCESS_KEY}\nspark.hadoop.fs.s3a.secret.key {AWS_SECRET_KEY}\n",
    ),
    "GCP_API_KEY": (
        'const firebaseConfig = {\n  apiKey: "{GCP_API_KEY}",\n  authDomain: "{project}.firebaseapp.com",\n  projectId: "{project}",\n};\n',
        "curl 'https://maps.googleapis.com/maps/api/geocode/json?address={city}&key={GCP_API_KEY}'\n",
        "GOOGLE_API_KEY={GCP_API_KEY}\nGOOGLE_CLOUD_PROJECT={project}\n",
        "The Gemini call returns 403 with my key {GCP_API_KEY}; is the Generative Language API enabled on {project}?",
        '<meta-data android:name="com.google.android.geo.API_KEY" android:value="{GCP_API_KEY}"/>\n',
    ),
    "GCP_SERVICE_ACCOUNT_KEY": (
        '{\n  "type": "service_account",\n  "project_id": "{project}",\n  "private_key_id": "{GCP_SERVICE_ACCOUNT_KEY__id}",\n  "private_key": "{GCP_SERVICE_ACCOUNT_KEY__pem}",\n  "client_email": "{EMAIL__sa}",\n  "client_id": "{n21}",\n  "auth_uri": "https://accounts.google.com/o/oauth2/auth",\n  "token_uri": "https://oauth2.googleapis.com/token"\n}\n',
        'Here is the key file I use, why does auth fail?\n{"type": "service_account", "project_id": "{project}", "private_key_id": "{GCP_SERVICE_ACCOUNT_KEY__id}", "private_key": "{GCP_SERVICE_ACCOUNT_KEY__pem}", "client_email": "{EMAIL__sa}"}\n',
    ),
    "AZURE_STORAGE_KEY": (
        "DefaultEndpointsProtocol=https;AccountName={account};AccountKey={AZURE_STORAGE_KEY};EndpointSuffix=core.windows.net",
        "AZURE_STORAGE_ACCOUNT={account}\nAZURE_STORAGE_KEY={AZURE_STORAGE_KEY}\n",
        "az storage blob upload --account-name {account} --account-key {AZURE_STORAGE_KEY} --container-name {bucket} --file report.csv\n",
        'service = BlobServiceClient(account_url="https://{account}.blob.core.windows.net", credential="{AZURE_STORAGE_KEY}")\n',
        '"ConnectionStrings": {\n  "Storage": "DefaultEndpointsProtocol=https;AccountName={account};AccountKey={AZURE_STORAGE_KEY}"\n}\n',
    ),
    "AZURE_CONNECTION_KEY": (
        "Endpoint=sb://{account}.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={AZURE_CONNECTION_KEY}",
        'EVENTHUB_CONNECTION="Endpoint=sb://{account}.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={AZURE_CONNECTION_KEY};EntityPath={word}"\n',
        "HostName={account}.azure-devices.net;DeviceId={word}-{n};SharedAccessKey={AZURE_CONNECTION_KEY}",
        "The upload URL is https://{account}.blob.core.windows.net/{bucket}/data.csv?sv=2022-11-02&ss=b&srt=o&sp=rw&se={date}T18:00:00Z&st={date}T09:00:00Z&spr=https&sig={AZURE_CONNECTION_KEY__sig} but it returns 403.",
    ),
    "GITHUB_TOKEN": (
        "git clone https://{user}:{GITHUB_TOKEN}@github.com/{company}/{repo}.git\n",
        "export GITHUB_TOKEN={GITHUB_TOKEN}\ngh pr list --repo {company}/{repo}\n",
        'headers = {"Authorization": f"token {GITHUB_TOKEN}", "Accept": "application/vnd.github+json"}\n',
        "- name: Checkout\n  uses: actions/checkout@v4\n  with:\n    token: {GITHUB_TOKEN}\n",
        "I created a fine-grained token {GITHUB_TOKEN} but pushing to {repo} still fails with 403.",
        "//npm.pkg.github.com/:_authToken={GITHUB_TOKEN}\n",
    ),
    "GITLAB_TOKEN": (
        "curl --header 'PRIVATE-TOKEN: {GITLAB_TOKEN}' 'https://gitlab.{company}.com/api/v4/projects'\n",
        "GITLAB_TOKEN={GITLAB_TOKEN}\nCI_PROJECT={company}/{repo}\n",
        "git remote set-url origin https://oauth2:{GITLAB_TOKEN}@gitlab.com/{company}/{repo}.git\n",
        "My personal access token {GITLAB_TOKEN} expired yesterday; how do I rotate it without breaking the runners?",
    ),
    "SLACK_TOKEN": (
        'client = WebClient(token="{SLACK_TOKEN}")\nclient.chat_postMessage(channel="#{word}", text="deploy done")\n',
        "SLACK_BOT_TOKEN={SLACK_TOKEN}\nSLACK_CHANNEL=#{word}\n",
        "curl -H 'Authorization: Bearer {SLACK_TOKEN}' https://slack.com/api/auth.test\n",
        "The bot token {SLACK_TOKEN} gets missing_scope when posting to #{word}. Which scope do I need?",
    ),
    "SLACK_WEBHOOK": (
        "curl -X POST -H 'Content-type: application/json' --data '{\"text\":\"Build {n} passed\"}' {SLACK_WEBHOOK}\n",
        "alerting:\n  slack:\n    webhook_url: {SLACK_WEBHOOK}\n    channel: '#{word}-alerts'\n",
        'requests.post("{SLACK_WEBHOOK}", json={"text": msg})\n',
    ),
    "STRIPE_KEY": (
        'stripe.api_key = "{STRIPE_KEY}"\ncustomer = stripe.Customer.create(email=email)\n',
        "STRIPE_SECRET_KEY={STRIPE_KEY}\nSTRIPE_WEBHOOK_URL=https://{company}.com/hooks/stripe\n",
        "curl https://api.stripe.com/v1/charges -u {STRIPE_KEY}: -d amount=2000 -d currency=usd\n",
        "const stripe = require('stripe')('{STRIPE_KEY}');\n",
        "Our live key {STRIPE_KEY} was in last week's logs. What do I need to rotate?",
    ),
    "ANTHROPIC_API_KEY": (
        "export ANTHROPIC_API_KEY={ANTHROPIC_API_KEY}\npython agent.py --model claude-sonnet-4-5\n",
        'client = anthropic.Anthropic(api_key="{ANTHROPIC_API_KEY}")\n',
        "curl https://api.anthropic.com/v1/messages -H 'x-api-key: {ANTHROPIC_API_KEY}' -H 'anthropic-version: 2023-06-01'\n",
        "Why does my key {ANTHROPIC_API_KEY} return 401 from the Messages API?",
    ),
    "OPENAI_API_KEY": (
        "OPENAI_API_KEY={OPENAI_API_KEY}\nOPENAI_ORG=org-{word}\n",
        'client = OpenAI(api_key="{OPENAI_API_KEY}")\n',
        "const openai = new OpenAI({ apiKey: '{OPENAI_API_KEY}' });\n",
        "I exported {OPENAI_API_KEY} but the SDK still says no API key was provided.",
    ),
    "PRIVATE_KEY": (
        "{PRIVATE_KEY__pgp}\n",
        "I only have the first part of the key file:\n{PRIVATE_KEY__truncated}\n",
        "{PRIVATE_KEY}\n",
        "Can you tell me why ssh rejects this key?\n\n{PRIVATE_KEY}\n\nThe permissions are 600.",
        "tls:\n  key: |\n    {PRIVATE_KEY__indented}\n  cert: server.crt\n",
        'KEY = """{PRIVATE_KEY}"""\n',
        'const key = "{PRIVATE_KEY__escaped}";\n',
    ),
    "JWT": (
        "GET /api/me?token={JWT} HTTP/1.1",
        "Authorization: Bearer {JWT}\n",
        'curl -H "Authorization: Bearer {JWT}" https://api.{company}.com/v2/orders\n',
        "This token fails validation with 'invalid signature', can you decode it? {JWT}",
        '{"access_token": "{JWT}", "token_type": "Bearer", "expires_in": 3600}\n',
        "document.cookie = 'session={JWT}; Secure; HttpOnly';\n",
    ),
    "URL_PASSWORD": (
        "DATABASE_URL=postgres://{user}:{URL_PASSWORD}@{host}:5432/{db}\n",
        'engine = create_engine("mysql+pymysql://{user}:{URL_PASSWORD}@{host}/{db}")\n',
        "MONGO_URI=mongodb+srv://{user}:{URL_PASSWORD}@cluster0.{word}.mongodb.net/{db}?retryWrites=true\n",
        "redis_url: redis://:{URL_PASSWORD}@{host}:6379/0\n",
        "The broker is amqp://{user}:{URL_PASSWORD}@{host}:5672/{word} and the consumer keeps reconnecting.",
        "pip install --index-url https://{user}:{URL_PASSWORD}@pypi.{company}.com/simple {word}\n",
    ),
    "CONNECTION_STRING_PASSWORD": (
        "Server=tcp:{host},1433;Initial Catalog={db};User ID={user};Password={CONNECTION_STRING_PASSWORD};Encrypt=True;",
        "Driver={ODBC Driver 18 for SQL Server};Server={host};Database={db};Uid={user};Pwd={CONNECTION_STRING_PASSWORD};",
        "jdbc:sqlserver://{host}:1433;databaseName={db};user={user};password={CONNECTION_STRING_PASSWORD};",
        "Host={host};Port=5432;Database={db};Username={user};Password={CONNECTION_STRING_PASSWORD}",
        '"DefaultConnection": "Data Source={host};Initial Catalog={db};User Id={user};Password={CONNECTION_STRING_PASSWORD};"\n',
    ),
    "GENERIC_SECRET": (
        'os.Setenv("DB_PASSWORD", "{GENERIC_SECRET__password}")\n',
        'headers["X-Api-Key"] = "{GENERIC_SECRET}"\n',
        "spring.datasource.url=jdbc:postgresql://{host}:5432/{db}\nspring.datasource.password={GENERIC_SECRET__password}\n",
        "ENV APP_SECRET={GENERIC_SECRET}\n",
        "KeyError while loading config {'user': '{user}', 'password': '{GENERIC_SECRET__password}', 'port': 5432}",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {word}\nstringData:\n  api-token: {GENERIC_SECRET}\n",
        "GET /v2/export?format=csv&access_token={GENERIC_SECRET}&page=2 HTTP/1.1",
        "docker run -e JWT_SECRET={GENERIC_SECRET} -p 8080:8080 {company}/{word}\n",
        "DB_PASSWORD={GENERIC_SECRET__password}\nDB_HOST={host}\nDB_PORT=5432\n",
        "database:\n  host: {host}\n  user: {user}\n  password: {GENERIC_SECRET__password}\n",
        '{\n  "client_id": "{word}-{n}",\n  "client_secret": "{GENERIC_SECRET}",\n  "redirect_uri": "https://{company}.com/callback"\n}\n',
        'API_KEY = "{GENERIC_SECRET}"\nBASE_URL = "https://api.{company}.com"\n',
        "const apiToken = '{GENERIC_SECRET}';\nfetch(url, { headers: { 'X-Token': apiToken } });\n",
        '[auth]\nsecret = "{GENERIC_SECRET}"\nissuer = "https://{company}.com"\n',
        "export SERVICE_TOKEN={GENERIC_SECRET}\n./deploy.sh {word}\n",
        "curl -H 'Authorization: Bearer {GENERIC_SECRET}' https://api.{company}.com/v1/items\n",
        "<connection>\n  <user>{user}</user>\n  <password>{GENERIC_SECRET__password}</password>\n</connection>\n",
        "./backup --host {host} --password {GENERIC_SECRET__cli} --out /tmp/{word}.tar\n",
        "X-Api-Key: {GENERIC_SECRET}\n",
        "webhook_secret: '{GENERIC_SECRET}'\n",
    ),
    "EMAIL": (
        "Forward this to {EMAIL__upper} (cc {EMAIL__2}).",
        "[{date} 10:22:01] INFO login ok user={EMAIL} ip=-",
        "mailto:{EMAIL}?subject=Question",
        '<a href="mailto:{EMAIL}">{first}</a>',
        "Hi team, please add {EMAIL} to the on-call rotation for {word}.",
        "From: {first} {last} <{EMAIL}>\nTo: {EMAIL__2}\nSubject: refund for order {n}\n",
        "user_email,signup_date\n{EMAIL},{date}\n{EMAIL__2},{date}\n",
        '{"id": {n}, "name": "{first} {last}", "email": "{EMAIL}", "active": true}\n',
        "Can you write a polite reply to {EMAIL} saying the invoice is attached?",
        'git config user.email "{EMAIL}"\n',
    ),
    "PHONE": (
        "text me at {PHONE__intl}",
        "Office: {PHONE__national} (ask for {first})",
        "tel:{PHONE__e164}",
        "Ring the front desk on {PHONE__national} before 9.",
        "My cell is {PHONE__bare}, call after lunch.",
        "Dial 00{PHONE__intl00} from abroad.",
        "Call me at {PHONE} after 5pm.",
        "Contact: {first} {last}, phone: {PHONE}, office in {city}",
        "name,phone,city\n{first} {last},{PHONE},{city}\n",
        "The customer left a voicemail from {PHONE} about order {n}.",
        '{"contact": {"name": "{first}", "mobile": "{PHONE}"}}\n',
        "Please reach {first} on {PHONE} or {PHONE__2} if urgent.",
    ),
    "PAYMENT_CARD": (
        "card={PAYMENT_CARD__compact}&exp=12/2{digit}&cvv={digit3}",
        "Amex {PAYMENT_CARD__amex} is the corporate card.",
        "Charge it to my card: {PAYMENT_CARD}.",
        "The charge on card {PAYMENT_CARD} (exp 0{digit}/2{digit}) was declined twice.",
        "card_number,holder,amount\n{PAYMENT_CARD},{first} {last},{n}.00\n",
        '{"payment": {"card": "{PAYMENT_CARD}", "cvc": "{digit3}", "currency": "EUR"}}\n',
        "Customer says card ending in {digit4} was charged; full number {PAYMENT_CARD}.",
        "Pay with {PAYMENT_CARD}, please, same as last time.",
    ),
    "IBAN": (
        "Refund to {IBAN}.",
        "Please wire the deposit to IBAN {IBAN}, reference {n}.",
        "Bankverbindung: {first} {last}, IBAN: {IBAN}, BIC: {bic}",
        "supplier,iban,amount\n{company},{IBAN},{n}.50\n",
        '{"payee": "{company}", "iban": "{IBAN}", "amount": {n}}\n',
    ),
    "US_SSN": (
        "SSN {US_SSN__bare} on the application does not match the W-2.",
        "ssn: {US_SSN__spaced}",
        "Applicant SSN: {US_SSN}, DOB {date}",
        "My social security number is {US_SSN}, can you fill in the W-4 for me?",
        "employee_id,ssn,start_date\n{n},{US_SSN},{date}\n",
        '{"name": "{first} {last}", "ssn": "{US_SSN}", "state": "TX"}\n',
    ),
    "IPV4": (
        "curl http://{IPV4}:{port}/metrics",
        "route add -net {IPV4__net}/24 gw {IPV4}",
        "The proxy ({IPV4}) returns 502.",
        "sshd[{n}]: Failed password for invalid user {user} from {IPV4} port {port} ssh2",
        '{IPV4} - - [{date}:10:01:22 +0000] "GET /api/v1/items HTTP/1.1" 200 {n}',
        "database:\n  host: {IPV4}\n  port: 5432\n",
        "Why can't I reach {IPV4} from the VPN? Traceroute stops at {IPV4__2}.",
        "server {\n    listen 80;\n    allow {IPV4};\n    deny all;\n}\n",
        "X-Forwarded-For: {IPV4}, {IPV4__2}",
    ),
    "IPV6": (
        "ping6 {IPV6}%eth0",
        "{IPV6__mapped} is the mapped address; the real client is {IPV6}.",
        "The health check hits http://[{IPV6}]:8080/healthz and times out.",
        "inet6 {IPV6}/64 scope global dynamic",
        '{"client_ip": "{IPV6}", "status": 200, "path": "/login"}\n',
        "sshd[{n}]: Accepted publickey for {user} from {IPV6} port {port} ssh2",
        "Add {IPV6} to the allow list, please.",
    ),
}
"""Templates per primary type (a template may carry other labelled types as well)."""


def _indent(value: str, spaces: int) -> str:
    return value.replace("\n", "\n" + " " * spaces)


def labelled_value(slot: str, rng: random.Random) -> str:
    """The value of an upper-case slot (``TYPE`` or ``TYPE__variant``)."""
    type_ = slot.partition("__")[0]
    if slot == "GCP_SERVICE_ACCOUNT_KEY__pem":
        pem = (
            "-----BEGIN PRIVATE KEY-----\n"
            + "\n".join(fakes.pem_body(rng, 1190))
            + "\n-----END PRIVATE KEY-----\n"
        )
        return json.dumps(pem)[1:-1]  # as it appears inside the JSON string
    if slot == "GCP_SERVICE_ACCOUNT_KEY__id":
        return fakes.rs(rng, fakes.HEX, 40)
    if slot == "EMAIL__sa":
        return f"{rng.choice(fakes.WORDS)}-sa@{rng.choice(fakes.COMPANIES)}-{rng.randrange(100, 999)}.iam.gserviceaccount.com"
    if slot == "AZURE_CONNECTION_KEY__sig":
        return fakes.azure_sas_sig(rng)
    if slot == "PRIVATE_KEY__indented":
        return _indent(fakes.private_key(rng), 4)
    if slot == "PRIVATE_KEY__escaped":
        return fakes.private_key(rng).replace("\n", "\\n")
    if slot == "EMAIL__upper":
        return fakes.email(rng).title()
    if slot == "PHONE__intl":
        return fakes.phone_intl(rng)
    if slot == "PHONE__intl00":  # the number after the 00 international prefix
        return fakes.phone_intl(rng).lstrip("+")
    if slot == "PHONE__national":
        return fakes.phone_national(rng)
    if slot == "PHONE__e164":
        return "+" + "".join(c for c in fakes.phone_intl(rng) if c.isdigit())
    if slot == "PHONE__bare":
        return "".join(c for c in fakes.phone_us(rng) if c.isdigit())[-10:]
    if slot == "PAYMENT_CARD__compact":
        return fakes.card_digits(rng)
    if slot == "PAYMENT_CARD__amex":
        return fakes.format_card(fakes.luhn_complete(rng.choice(("34", "37")), 15, rng), rng)
    if slot == "US_SSN__bare":
        return fakes.ssn(rng).replace("-", "")
    if slot == "US_SSN__spaced":
        return fakes.ssn(rng).replace("-", " ")
    if slot == "IPV4__net":
        return fakes.ipv4(rng).rsplit(".", 1)[0] + ".0"
    if slot == "IPV6__mapped":
        return "::ffff:" + fakes.ipv4(rng)
    if slot == "PRIVATE_KEY__pgp":
        return fakes.pgp_private_key(rng)
    if slot == "PRIVATE_KEY__dsa":
        return (
            "-----BEGIN DSA PRIVATE KEY-----\n"
            + "\n".join(fakes.pem_body(rng, 420))
            + "\n-----END DSA PRIVATE KEY-----"
        )
    if slot == "PHONE__us_intl":
        area, exchange, line = fakes.nanp(rng)
        return f"+1 ({area}) {exchange}-{line}"
    if slot == "PRIVATE_KEY__truncated":
        return "\n".join(fakes.private_key(rng).splitlines()[:6])
    if slot == "GENERIC_SECRET__password":
        return fakes.password(rng)
    if slot == "GENERIC_SECRET__cli":  # a value starting with "-" would be the next flag
        while True:
            value = fakes.password(rng)
            if not value.startswith("-"):
                return value
    return fakes.GENERATORS[type_](rng)


def filler(name: str, rng: random.Random) -> str:
    """The value of a lower-case (unlabelled) slot."""
    if name in ("first", "user"):
        v = rng.choice(fakes.FIRST)
        return v if name == "user" else v.capitalize()
    if name == "last":
        return rng.choice(fakes.LAST).capitalize()
    if name == "host":
        return (
            rng.choice(("db", "pg", "sql", "cache", "mq"))
            + f"-{rng.randrange(1, 9)}.{rng.choice(fakes.COMPANIES)}.internal"
        )
    if name in ("db", "word", "repo", "bucket", "account", "project"):
        base = rng.choice(fakes.WORDS)
        return {"account": base + "store", "project": f"{base}-{rng.randrange(100, 999)}"}.get(name, base)
    if name == "company":
        return rng.choice(fakes.COMPANIES)
    if name == "region":
        return rng.choice(fakes.REGIONS)
    if name == "city":
        return rng.choice(fakes.CITIES)
    if name == "date":
        return f"{rng.randrange(2019, 2027)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if name == "port":
        return str(rng.randrange(1024, 65535))
    if name == "n":
        return str(rng.randrange(2, 99999))
    if name == "n21":
        return str(rng.randrange(10**20, 10**21))
    if name.startswith("digit"):
        return fakes.rs(rng, string.digits, int(name[5:] or 1))
    if name == "bic":
        return fakes.rs(rng, string.ascii_uppercase, 6) + fakes.rs(
            rng, string.ascii_uppercase + string.digits, 2
        )
    raise KeyError(f"unknown filler slot {name!r}")


def render(template: str, rng: random.Random) -> tuple[str, list[tuple[str, int, int]]]:
    """Fill a template; returns the text and the labels ``(type, start, end)`` of its values."""
    values: dict[str, str] = {}
    out: list[str] = []
    labels: list[tuple[str, int, int]] = []
    pos = size = 0
    for match in SLOT.finditer(template):
        name = match.group(1)
        start, end = match.span()
        literal = template[pos:start]
        out.append(literal)
        size += len(literal)
        if name not in values:
            values[name] = labelled_value(name, rng) if name[0].isupper() else filler(name, rng)
        value = values[name]
        if name[0].isupper():
            labels.append((name.partition("__")[0], size, size + len(value)))
        out.append(value)
        size += len(value)
        pos = end
    out.append(template[pos:])
    return "".join(out), labels


HELD_OUT: dict[str, tuple[str, ...]] = {
    "AWS_ACCESS_KEY": (
        '"aws": {"accessKeyId": "{AWS_ACCESS_KEY}", "secretAccessKey": "{AWS_SECRET_KEY}"}',
        "AWS_ACCESS_KEY_ID='{AWS_ACCESS_KEY}' terraform plan",
    ),
    "AWS_SECRET_KEY": (
        'aws_secret_access_key: "{AWS_SECRET_KEY}"\nregion: {region}\n',
        "mc alias set s3 https://s3.amazonaws.com {AWS_ACCESS_KEY} --secret-key {AWS_SECRET_KEY}",
    ),
    "GCP_API_KEY": (
        '{"key": "{GCP_API_KEY}", "project": "{project}"}',
        "gcloud services call --api-key={GCP_API_KEY}",
    ),
    "GCP_SERVICE_ACCOUNT_KEY": (
        "{'type': 'service_account', 'project_id': '{project}', 'private_key_id': '{GCP_SERVICE_ACCOUNT_KEY__id}'}",
    ),
    "AZURE_STORAGE_KEY": (
        'AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=https;AccountName={account};AccountKey={AZURE_STORAGE_KEY};EndpointSuffix=core.windows.net"',
    ),
    "AZURE_CONNECTION_KEY": (
        '"connectionString": "Endpoint=sb://{account}.servicebus.windows.net/;SharedAccessKeyName=app;SharedAccessKey={AZURE_CONNECTION_KEY}"',
    ),
    "GITHUB_TOKEN": ("echo {GITHUB_TOKEN} | gh auth login --with-token", '"github.token": "{GITHUB_TOKEN}"'),
    "GITLAB_TOKEN": ("glab auth login --hostname gitlab.{company}.com --token {GITLAB_TOKEN}",),
    "SLACK_TOKEN": ("SLACK_APP_TOKEN={SLACK_TOKEN}", '{"ok": true, "token": "{SLACK_TOKEN}"}'),
    "SLACK_WEBHOOK": ('SLACK_WEBHOOK_URL="{SLACK_WEBHOOK}"',),
    "STRIPE_KEY": ('Stripe.apiKey = "{STRIPE_KEY}";',),
    "ANTHROPIC_API_KEY": (
        "ANTHROPIC_API_KEY: {ANTHROPIC_API_KEY}",
        '{"anthropic_api_key": "{ANTHROPIC_API_KEY}"}',
    ),
    "OPENAI_API_KEY": ("openai.api_key = '{OPENAI_API_KEY}'",),
    "PRIVATE_KEY": ("{PRIVATE_KEY__dsa}\n",),
    "JWT": ("Cookie: session={JWT}; theme=dark", "https://{company}.com/cb#id_token={JWT}&state=xyz"),
    "URL_PASSWORD": (
        "pip install git+https://{user}:{URL_PASSWORD}@git.{company}.com/{repo}.git",
        "SMTP_URL=smtp://{user}:{URL_PASSWORD}@smtp.{company}.com:587",
        "ftp://{user}:{URL_PASSWORD}@files.{company}.com/pub/",
    ),
    "CONNECTION_STRING_PASSWORD": (
        '"Server={host};Database={db};Trusted_Connection=False;User Id={user};Password = {CONNECTION_STRING_PASSWORD};"',
        "User Id={user};Password={CONNECTION_STRING_PASSWORD};Data Source=orcl",
    ),
    "GENERIC_SECRET": (
        "production:\n  secret_key_base: {GENERIC_SECRET}\n",
        '$config = ["user" => "{user}", "password" => "{GENERIC_SECRET__password}"];',
        "export VAULT_TOKEN={GENERIC_SECRET}",
        "//registry.npmjs.org/:_authToken={GENERIC_SECRET}",
        "set PGPASSWORD={GENERIC_SECRET__password}",
        'CLIENT_SECRET: "{GENERIC_SECRET}"',
    ),
    "EMAIL": ('"{first} {last}" <{EMAIL}>', "owner:\n  email: {EMAIL}\n", "Reply-To: {EMAIL}"),
    "PHONE": ("Tel. {PHONE}", 'phone_number: "{PHONE}"', "WhatsApp: {PHONE__intl}", "{PHONE__us_intl}"),
    "PAYMENT_CARD": ("id,card\n{n},{PAYMENT_CARD}\n", "Visa ending {digit4}: {PAYMENT_CARD__compact}"),
    "IBAN": ("IBAN: {IBAN} (BIC {bic})",),
    "US_SSN": ("SSN#: {US_SSN}", "social security no. {US_SSN__bare}"),
    "IPV4": ("ssh ubuntu@{IPV4}", "host {IPV4} has address", "allow {IPV4}/32;"),
    "IPV6": ("https://[{IPV6}]:443/", "AAAA {IPV6}"),
}
"""Templates written after the detectors were tuned on :data:`TEMPLATES`, in styles absent there.

The benchmark scores them apart from the targets, as an estimate for formats nobody wrote a
template for. Their first run found 960 of 1,035 labels (92.75 %): a service-account key in a
Python dict's repr (0/40), an IPv4 address after ``user@`` (23/40) and a card number after a CSV
id (22/40) were missed. Those three gaps were then fixed, so this set is no longer unseen; new
held-out templates should be added here *before* looking at their results.
"""
