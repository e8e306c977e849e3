/* Cistern policy ABI, version 3: the `cistern` import module for C guests.
 *
 * The one written spec is guest-sdk/ABI.md; this header mirrors it. Build
 * with Debian's clang and lld, no libc needed:
 *
 *   clang --target=wasm32 -nostdlib -O2 -Wl,--no-entry -Wl,--export-dynamic \
 *         -o policy.wasm policy.c
 *
 * and mark the exports with CISTERN_EXPORT (see examples/c/policy.c).
 * Pointers and lengths are offsets and byte counts in the module's exported
 * `memory`. Functions return a non-negative value or a CISTERN_ERR_* code.
 * Output buffers: the full length of the value is returned; the bytes are
 * written only when that length is <= the capacity passed in.
 */
#ifndef CISTERN_H
#define CISTERN_H

#include <stdint.h>

#define CISTERN_ABI_VERSION 3

#define CISTERN_IMPORT(name) __attribute__((import_module("cistern"), import_name(name)))
#define CISTERN_EXPORT(name) __attribute__((export_name(name)))

/* Error codes. */
#define CISTERN_ERR_NOT_FOUND (-1)
#define CISTERN_ERR_OUT_OF_BOUNDS (-2)
#define CISTERN_ERR_INVALID (-3)
#define CISTERN_ERR_WRONG_HOOK (-4)
#define CISTERN_ERR_TOO_LARGE (-5)
#define CISTERN_ERR_UNKNOWN_LIMITER (-6)

/* request_get / request_set fields. */
#define CISTERN_FIELD_METHOD 0
#define CISTERN_FIELD_URL 1
#define CISTERN_FIELD_PATH 2
#define CISTERN_FIELD_QUERY 3
#define CISTERN_FIELD_HOST 4
#define CISTERN_FIELD_CLIENT_ADDR 5
#define CISTERN_FIELD_CLIENT_IP 6
#define CISTERN_FIELD_CACHE_KEY 7
#define CISTERN_FIELD_UPSTREAM_URL 8

/* Header targets. */
#define CISTERN_TARGET_REQUEST 0
#define CISTERN_TARGET_RESPONSE 1

/* cache_set operations. */
#define CISTERN_CACHE_UNCACHEABLE 0
#define CISTERN_CACHE_TTL 1
#define CISTERN_CACHE_TTL_CAP 2
#define CISTERN_CACHE_IMMUTABLE 3

/* replica_state results. */
#define CISTERN_REPLICA_ABSENT 0
#define CISTERN_REPLICA_PARTIAL 1
#define CISTERN_REPLICA_COMPLETE 2

/* log levels. */
#define CISTERN_LOG_ERROR 0
#define CISTERN_LOG_WARN 1
#define CISTERN_LOG_INFO 2
#define CISTERN_LOG_DEBUG 3

CISTERN_IMPORT("request_get")
int32_t cistern_request_get(int32_t field, char *out, int32_t out_cap);
CISTERN_IMPORT("request_set")
int32_t cistern_request_set(int32_t field, const char *value, int32_t value_len);
CISTERN_IMPORT("response_status")
int32_t cistern_response_status(void);
CISTERN_IMPORT("header_get")
int32_t cistern_header_get(int32_t target, const char *name, int32_t name_len, int32_t index,
                           char *out, int32_t out_cap);
CISTERN_IMPORT("header_names")
int32_t cistern_header_names(int32_t target, char *out, int32_t out_cap);
CISTERN_IMPORT("header_set")
int32_t cistern_header_set(int32_t target, const char *name, int32_t name_len, const char *value,
                           int32_t value_len);
CISTERN_IMPORT("header_add")
int32_t cistern_header_add(int32_t target, const char *name, int32_t name_len, const char *value,
                           int32_t value_len);
CISTERN_IMPORT("header_remove")
int32_t cistern_header_remove(int32_t target, const char *name, int32_t name_len);
CISTERN_IMPORT("cache_set")
int32_t cistern_cache_set(int32_t op, int64_t value);
CISTERN_IMPORT("respond")
int32_t cistern_respond(int32_t status, const char *body, int32_t body_len);
CISTERN_IMPORT("replica_state")
int32_t cistern_replica_state(const char *key, int32_t key_len);
CISTERN_IMPORT("url_by_sha256")
int32_t cistern_url_by_sha256(const uint8_t *digest, int32_t digest_len, char *out, int32_t out_cap);
CISTERN_IMPORT("limiter_check")
int32_t cistern_limiter_check(const char *name, int32_t name_len, const char *key, int32_t key_len);
CISTERN_IMPORT("param_get")
int32_t cistern_param_get(const char *name, int32_t name_len, int32_t index, char *out,
                          int32_t out_cap);
CISTERN_IMPORT("log")
int32_t cistern_log(int32_t level, const char *message, int32_t message_len);
/* Version 2, in `on_body` only. */
CISTERN_IMPORT("body_get")
int32_t cistern_body_get(char *out, int32_t out_cap);
CISTERN_IMPORT("body_set")
int32_t cistern_body_set(const char *body, int32_t body_len);
/* Version 3, in `on_request` only: this call's effects may be reused for
   `seconds` on requests with the same values of what it read (ABI.md §18). */
CISTERN_IMPORT("reuse_outcome")
int32_t cistern_reuse_outcome(int32_t seconds);

/* Exports the version marker; use once per module. */
#define CISTERN_POLICY_VERSION_EXPORT                                        \
    CISTERN_EXPORT("cistern_abi_version") int32_t cistern_abi_version(void) { \
        return CISTERN_ABI_VERSION;                                          \
    }

#endif
