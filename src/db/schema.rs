//! One diesel schema for both backends (the migrations in `schema/` keep the types aligned).

diesel::table! {
    cas (id) {
        id -> Text,
        state -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    profiles (id) {
        id -> Text,
        ca_id -> Text,
        state -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    registry (id) {
        id -> Integer,
        version -> BigInt,
    }
}

diesel::table! {
    instances (id) {
        id -> Text,
        started_at -> BigInt,
        heartbeat_at -> BigInt,
        registry_version -> BigInt,
        address -> Text,
        tree -> Text,
    }
}

diesel::table! {
    requests (id) {
        id -> Text,
        client -> Text,
        profile -> Text,
        ca_id -> Text,
        mode -> Text,
        state -> Text,
        idempotency_key -> Nullable<Text>,
        body_sha256 -> Text,
        csr_der -> Binary,
        serial -> Nullable<Text>,
        error_type -> Nullable<Text>,
        error_detail -> Nullable<Text>,
        created_at -> BigInt,
        updated_at -> BigInt,
        expires_at -> BigInt,
        claimed_by -> Nullable<Text>,
        claimed_until -> Nullable<BigInt>,
    }
}

diesel::table! {
    certificates (serial) {
        serial -> Text,
        ca_id -> Text,
        profile -> Text,
        client -> Text,
        request_id -> Nullable<Text>,
        state -> Text,
        tbs_der -> Binary,
        cert_der -> Nullable<Binary>,
        not_before -> BigInt,
        not_after -> BigInt,
        created_at -> BigInt,
        issued_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
        revocation_reason -> Nullable<Integer>,
        crl_shard -> Nullable<Integer>,
    }
}

diesel::table! {
    crl_shards (ca_id, shard) {
        ca_id -> Text,
        shard -> Integer,
        crl_number -> BigInt,
        this_update -> Nullable<BigInt>,
        next_update -> Nullable<BigInt>,
        der -> Nullable<Binary>,
        stale_since -> Nullable<BigInt>,
        revision -> BigInt,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<BigInt>,
    }
}

diesel::table! {
    audit_log (id) {
        id -> BigInt,
        at -> BigInt,
        instance -> Text,
        actor -> Text,
        action -> Text,
        target -> Text,
        outcome -> Text,
        detail -> Text,
        count -> BigInt,
        first_at -> Nullable<BigInt>,
        seq -> Nullable<BigInt>,
        prev_hash -> Nullable<Text>,
        hash -> Nullable<Text>,
    }
}

diesel::table! {
    identities (id) {
        id -> Text,
        client -> Text,
        profile -> Text,
        ca_id -> Text,
        serial -> Text,
        key_type -> Text,
        signature_scheme -> Text,
        state -> Text,
        sealed_key -> Nullable<Binary>,
        kek_id -> Text,
        uses -> BigInt,
        max_uses -> BigInt,
        created_at -> BigInt,
        expires_at -> BigInt,
        destroyed_at -> Nullable<BigInt>,
        destroy_reason -> Nullable<Text>,
    }
}
