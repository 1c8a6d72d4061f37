"""The durable ingest floor: the decrypt-only floor (bench/floor_app.py) plus the obvious durable write.

One `INSERT IGNORE` of the event under a unique key (a digest of the plaintext), autocommitted (so committed,
with MariaDB's `innodb_flush_log_at_trx_commit=1`, before the answer), over PyMySQL, one connection per
thread. Run under the same gunicorn settings as the service:
`gunicorn -c gunicorn.conf.py 'bench.durable_floor_app:create_app()'` with DATABASE_URL set.
"""
import hashlib
import os
import threading

import pymysql
from flask import Flask, request
from sqlalchemy.engine import make_url
from wechatpy.enterprise.crypto import WeChatCrypto

TABLE = ("CREATE TABLE IF NOT EXISTS bench_floor_events (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
         "dedup_key CHAR(64) NOT NULL UNIQUE, xml MEDIUMTEXT NOT NULL) ENGINE=InnoDB")
INSERT = "INSERT IGNORE INTO bench_floor_events (dedup_key, xml) VALUES (%s, %s)"


def create_app() -> Flask:
    """The durable floor app, configured from the same WECOM_* variables and DATABASE_URL as the service."""
    crypto = WeChatCrypto(os.environ["WECOM_CALLBACK_TOKEN"], os.environ["WECOM_CALLBACK_AES_KEY"],
                          os.environ["WECOM_CORP_ID"])
    url = make_url(os.environ["DATABASE_URL"])
    params = {"host": url.host, "port": url.port or 3306, "user": url.username, "password": url.password or "",
              "database": url.database, "autocommit": True, "charset": "utf8mb4"}
    local = threading.local()

    def cursor():
        if getattr(local, "connection", None) is None:
            local.connection = pymysql.connect(**params)
        return local.connection.cursor()

    with cursor() as first:
        first.execute(TABLE)
    local.connection.close()  # made before gunicorn forks its workers: not to be shared with them
    local.connection = None
    app = Flask(__name__)

    @app.post(os.environ.get("CALLBACK_PATH", "/wecom/callback"))
    def callback():
        args = request.args
        xml = crypto.decrypt_message(request.get_data(), args["msg_signature"], args["timestamp"], args["nonce"])
        with cursor() as cur:
            cur.execute(INSERT, (hashlib.sha256(xml.encode("utf-8")).hexdigest(), xml))
        return "success"

    return app
