-- API keys that may grant wallet credit (POST /v1/wallets/{customer}/grants): credit is money,
-- so a key sending usage cannot create it unless it was made for that (tally keys create --grants).
ALTER TABLE tally.api_keys ADD COLUMN may_grant boolean NOT NULL DEFAULT false;
