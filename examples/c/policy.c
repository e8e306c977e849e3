/* The example policy in C (no libc):
 * - requests under the `limited-prefix` parameter (default "/api/") are
 *   rate-limited per client by the `per-client` limiter: 429 + Retry-After;
 * - requests whose URL has a query bypass the cache;
 * - responses get `x-policy: c`;
 * - outside the prefix, the host may reuse a decision (reuse_outcome).
 */
#include "cistern.h"

#define STR(s) s, (int32_t)(sizeof(s) - 1)

CISTERN_POLICY_VERSION_EXPORT

static char path[2048];
static char prefix[256];
static char client_ip[64];
static char digits[12];

static int starts_with(const char *s, int32_t len, const char *p, int32_t plen) {
    if (plen > len) return 0;
    for (int32_t i = 0; i < plen; i++)
        if (s[i] != p[i]) return 0;
    return 1;
}

static int32_t decimal(int32_t n) {
    int32_t len = 0;
    char tmp[12];
    do {
        tmp[len++] = (char)('0' + n % 10);
        n /= 10;
    } while (n > 0);
    for (int32_t i = 0; i < len; i++) digits[i] = tmp[len - 1 - i];
    return len;
}

CISTERN_EXPORT("on_request") int32_t on_request(void) {
    if (cistern_request_get(CISTERN_FIELD_QUERY, 0, 0) >= 0)
        cistern_cache_set(CISTERN_CACHE_UNCACHEABLE, 0);

    int32_t path_len = cistern_request_get(CISTERN_FIELD_PATH, path, sizeof path);
    if (path_len < 0 || path_len > (int32_t)sizeof path) return 0;
    int32_t prefix_len = cistern_param_get(STR("limited-prefix"), 0, prefix, sizeof prefix);
    if (prefix_len < 0 || prefix_len > (int32_t)sizeof prefix) {
        prefix_len = 5;
        for (int32_t i = 0; i < 5; i++) prefix[i] = "/api/"[i];
    }
    if (!starts_with(path, path_len, prefix, prefix_len)) {
        /* Outside the prefix the decision depends only on the path and the
         * query read above: the host may apply it to the next request with
         * the same ones without calling (ABI version 3). Inside, the
         * limiter is asked, and such a call is never reused. */
        cistern_reuse_outcome(3600);
        return 0;
    }

    int32_t ip_len = cistern_request_get(CISTERN_FIELD_CLIENT_IP, client_ip, sizeof client_ip);
    if (ip_len < 0 || ip_len > (int32_t)sizeof client_ip) return 1;
    int32_t wait = cistern_limiter_check(STR("per-client"), client_ip, ip_len);
    if (wait < 0) return 1; /* no such limiter: fail per on-error */
    if (wait > 0) {
        cistern_header_set(CISTERN_TARGET_RESPONSE, STR("retry-after"), digits, decimal(wait));
        cistern_respond(429, STR("rate limited\n"));
    }
    return 0;
}

CISTERN_EXPORT("on_response") int32_t on_response(void) {
    return cistern_header_set(CISTERN_TARGET_RESPONSE, STR("x-policy"), STR("c")) < 0;
}
