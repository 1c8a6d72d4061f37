"""The ingest floor: a minimal Flask app that only verifies and decrypts with wechatpy and answers `success`.

Run under the same gunicorn settings as the service: `gunicorn -c gunicorn.conf.py 'bench.floor_app:create_app()'`.
"""
import os

from flask import Flask, request
from wechatpy.enterprise.crypto import WeChatCrypto


def create_app() -> Flask:
    """The floor app, configured from the same WECOM_* variables as the service."""
    crypto = WeChatCrypto(os.environ["WECOM_CALLBACK_TOKEN"], os.environ["WECOM_CALLBACK_AES_KEY"],
                          os.environ["WECOM_CORP_ID"])
    app = Flask(__name__)

    @app.post(os.environ.get("CALLBACK_PATH", "/wecom/callback"))
    def callback():
        args = request.args
        crypto.decrypt_message(request.get_data(), args["msg_signature"], args["timestamp"], args["nonce"])
        return "success"

    return app
