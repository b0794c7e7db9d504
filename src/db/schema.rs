//! Table definitions shared by both backends (types that PostgreSQL and SQLite both map).

diesel::table! {
    users (id) {
        id -> Text,
        name -> Text,
        status -> Text,
        level -> Integer,
        fallback_levels -> Text,
        ip_allowlist -> Text,
        allowed_models -> Text,
        allowed_endpoints -> Text,
        spend_limit_nanos -> Nullable<BigInt>,
        spent_nanos -> BigInt,
        rpm -> Nullable<BigInt>,
        tpm -> Nullable<BigInt>,
        model_limits -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    user_keys (id) {
        id -> Text,
        user_id -> Text,
        name -> Nullable<Text>,
        key_hash -> Text,
        key_hint -> Text,
        created_at -> Timestamp,
        expires_at -> Nullable<Timestamp>,
        revoked_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    upstream_keys (id) {
        id -> Text,
        provider -> Text,
        base_url -> Text,
        secret_enc -> Text,
        secret_hint -> Text,
        level -> Integer,
        models -> Text,
        weight -> Integer,
        enabled -> Bool,
        cooldown_until -> Nullable<Timestamp>,
        disabled_at -> Nullable<Timestamp>,
        disabled_reason -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    model_mappings (id) {
        id -> Text,
        from_pattern -> Text,
        to_model -> Text,
        user_id -> Nullable<Text>,
        created_at -> Timestamp,
    }
}

diesel::table! {
    prices (model) {
        model -> Text,
        input_per_mtok_nanos -> BigInt,
        output_per_mtok_nanos -> BigInt,
        cached_input_per_mtok_nanos -> Nullable<BigInt>,
        reasoning_per_mtok_nanos -> Nullable<BigInt>,
        per_image_nanos -> Nullable<BigInt>,
        per_audio_second_nanos -> Nullable<BigInt>,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    usage_daily (day, user_id, model) {
        day -> Text,
        user_id -> Text,
        model -> Text,
        requests -> BigInt,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
        reasoning_tokens -> BigInt,
        cached_tokens -> BigInt,
        images -> BigInt,
        audio_seconds -> Double,
        characters -> BigInt,
        cost_nanos -> BigInt,
    }
}

diesel::table! {
    request_logs (id) {
        id -> Text,
        ts -> Timestamp,
        user_id -> Nullable<Text>,
        key_id -> Nullable<Text>,
        route -> Text,
        model -> Nullable<Text>,
        upstream_model -> Nullable<Text>,
        upstream_key_id -> Nullable<Text>,
        level -> Nullable<Integer>,
        status -> Integer,
        attempts -> Integer,
        latency_ms -> BigInt,
        ttfb_ms -> Nullable<BigInt>,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
        cost_nanos -> BigInt,
        partial -> Bool,
        error_code -> Nullable<Text>,
        metered -> Bool,
        reasoning_tokens -> BigInt,
        cached_tokens -> BigInt,
        images -> BigInt,
        audio_seconds -> Double,
        characters -> BigInt,
    }
}

diesel::table! {
    meta (key) {
        key -> Text,
        value -> Text,
    }
}

diesel::joinable!(user_keys -> users (user_id));
diesel::allow_tables_to_appear_in_same_query!(users, user_keys);
