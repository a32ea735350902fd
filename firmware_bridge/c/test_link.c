/*
 * test_link.c - host test harness for pal_link.c.
 *
 *     cc -std=c99 -Wall -Wextra -pedantic -Werror test_link.c pal_link.c -o test_link
 *     ./test_link ../LINK.md
 *
 * Checks the codec against the test vectors in LINK.md (read at run time, so the document
 * stays the only copy of them) and against properties that need no vectors: streaming and
 * one-shot encoding agree, byte-at-a-time and bulk decoding agree for any split of the input,
 * encoded sizes stay within PAL_LINK_ENCODED_MAX, buffers are never overrun, and the CRC agrees
 * with a bit-by-bit reference at every length and alignment. Build it once per CRC option
 * (-DPAL_LINK_CRC_TABLE_FREE, -DPAL_LINK_CRC_BYTE_TABLE, -DPAL_LINK_CRC_SLICE8) to cover each.
 *
 * Exits 0 when every check passed. Unlike the codec, this file uses stdio and stdlib freely.
 */
#include "pal_link.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BYTES 4096 /* longest hex field in a vector, decoded */
#define MAX_FRAMES 16  /* most frames a decode vector expects */
#define GUARD 0xA5u    /* fills the bytes after a buffer, to catch overruns */

static int passed;
static int failed;

static void check(int ok, const char *what, const char *name)
{
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL %s [%s]\n", what, name);
    }
}

/* ---- small helpers ----------------------------------------------------------------------- */

static uint32_t rng_state = 0x9E3779B9u;

static uint32_t rng(void)
{
    /* xorshift32: deterministic, so a failure reproduces */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static uint32_t crc_reference(const uint8_t *p, size_t n)
{
    uint32_t reg = 0xFFFFFFFFu;
    size_t i;
    int k;

    for (i = 0; i < n; i++) {
        reg ^= p[i];
        for (k = 0; k < 8; k++) {
            reg = (reg & 1u) ? (reg >> 1) ^ 0xEDB88320u : reg >> 1;
        }
    }
    return ~reg;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes hex into out; returns the byte count or -1. */
static long unhex(const char *s, uint8_t *out, size_t cap)
{
    size_t n = 0;

    while (s[0] != '\0') {
        int hi = hexval((unsigned char)s[0]);
        int lo = hi < 0 ? -1 : hexval((unsigned char)s[1]);
        if (lo < 0 || n == cap) {
            return -1;
        }
        out[n++] = (uint8_t)(hi * 16 + lo);
        s += 2;
    }
    return (long)n;
}

/* Value of key=... among the tokens of a vector line, or NULL. */
static const char *field(char **tokens, int ntok, const char *key)
{
    size_t klen = strlen(key);
    int i;

    for (i = 2; i < ntok; i++) {
        if (strncmp(tokens[i], key, klen) == 0 && tokens[i][klen] == '=') {
            return tokens[i] + klen + 1;
        }
    }
    return NULL;
}

static long hex_field(char **tokens, int ntok, const char *key, uint8_t *out, size_t cap)
{
    const char *v = field(tokens, ntok, key);
    return v == NULL ? -1 : unhex(v, out, cap);
}

static unsigned long num_field(char **tokens, int ntok, const char *key)
{
    const char *v = field(tokens, ntok, key);
    return v == NULL ? ULONG_MAX : strtoul(v, NULL, 0);
}

/* ---- decoding with recorded results ------------------------------------------------------- */

typedef struct {
    int count;
    uint8_t channel[MAX_FRAMES];
    size_t len[MAX_FRAMES];
    uint8_t payload[MAX_FRAMES][MAX_BYTES];
} frames_t;

static void record(frames_t *fr, const pal_link_frame_t *f)
{
    if (fr->count < MAX_FRAMES && f->len <= MAX_BYTES) {
        fr->channel[fr->count] = f->channel;
        fr->len[fr->count] = f->len;
        memcpy(fr->payload[fr->count], f->payload, f->len);
    }
    fr->count++;
}

/* Decode `in` in pieces of `step` bytes (0 = one push per byte) into fr; returns the stats. */
static pal_link_stats_t decode(const uint8_t *in, size_t n, size_t max_payload, size_t step,
                               frames_t *fr)
{
    static uint8_t buf[MAX_BYTES + 64];
    pal_link_dec_t d;
    pal_link_frame_t f;
    size_t cap = PAL_LINK_DEC_BUF_SIZE(max_payload);
    size_t i = 0;

    memset(buf, GUARD, sizeof buf);
    fr->count = 0;
    pal_link_dec_init(&d, buf, cap);
    while (i < n) {
        if (step == 0) {
            if (pal_link_dec_push(&d, in[i], &f)) {
                record(fr, &f);
            }
            i++;
        } else {
            size_t piece = n - i < step ? n - i : step;
            size_t used;
            while (piece > 0) {
                if (pal_link_dec_feed(&d, in + i, piece, &used, &f)) {
                    record(fr, &f);
                }
                i += used;
                piece -= used;
            }
        }
    }
    for (i = cap; i < sizeof buf; i++) {
        if (buf[i] != GUARD) {
            fr->count = -1000; /* overrun: no expectation can match */
        }
    }
    return d.stats;
}

/* ---- vector kinds ------------------------------------------------------------------------ */

static void test_frame_vector(char **tok, int ntok)
{
    static uint8_t payload[MAX_BYTES], wire[MAX_BYTES], out[MAX_BYTES + 16];
    const char *name = tok[1];
    unsigned long channel = num_field(tok, ntok, "channel");
    long plen = hex_field(tok, ntok, "payload", payload, sizeof payload);
    long wlen = hex_field(tok, ntok, "wire", wire, sizeof wire);
    int32_t n;
    size_t split, step;
    frames_t *fr = malloc(sizeof *fr);

    if (plen < 0 || wlen < 0 || channel > 255 || fr == NULL) {
        check(0, "frame vector parses", name);
        free(fr);
        return;
    }

    memset(out, GUARD, sizeof out);
    n = pal_link_encode((uint8_t)channel, payload, (size_t)plen, out, (size_t)wlen);
    check(n == wlen && memcmp(out, wire, (size_t)wlen) == 0, "encode matches wire", name);
    check(out[wlen] == GUARD, "encode stays inside an exact-size buffer", name);
    check((size_t)wlen <= PAL_LINK_ENCODED_MAX((size_t)plen), "wire within ENCODED_MAX", name);
    n = pal_link_encode((uint8_t)channel, payload, (size_t)plen, out, (size_t)wlen - 1);
    check(n == PAL_LINK_ERR_SPACE, "encode reports a buffer one byte short", name);

    for (split = 0; split <= (size_t)plen; split++) {
        pal_link_enc_t e;
        pal_link_enc_begin(&e, out, sizeof out, (uint8_t)channel);
        pal_link_enc_write(&e, payload, split);
        pal_link_enc_write(&e, payload + split, (size_t)plen - split);
        n = pal_link_enc_end(&e);
        if (n != wlen || memcmp(out, wire, (size_t)wlen) != 0) {
            check(0, "streaming encode matches wire at every split", name);
            break;
        }
    }
    if (split > (size_t)plen) {
        check(1, "streaming encode matches wire at every split", name);
    }

    for (step = 0; step <= 3; step++) {
        pal_link_stats_t s = decode(wire, (size_t)wlen, (size_t)plen, step, fr);
        check(fr->count == 1 && fr->channel[0] == channel && fr->len[0] == (size_t)plen
                  && memcmp(fr->payload[0], payload, (size_t)plen) == 0 && s.frames == 1,
              "decode gives the payload back (buffer of exactly max_payload)", name);
    }
    if (plen > 0) {
        pal_link_stats_t s = decode(wire, (size_t)wlen, (size_t)plen - 1, 1, fr);
        check(fr->count == 0 && s.oversize == 1, "one byte over max_payload is oversize", name);
    }
    free(fr);
}

static void test_crc_vector(char **tok, int ntok)
{
    static uint8_t data[MAX_BYTES];
    long n = hex_field(tok, ntok, "data", data, sizeof data);
    const char *want = field(tok, ntok, "crc");

    check(n >= 0 && want != NULL && pal_link_crc32(0, data, (size_t)n) == strtoul(want, NULL, 16),
          "crc vector", tok[1]);
}

static void test_control_vector(char **tok, int ntok)
{
    uint8_t payload[64], out[PAL_LINK_HELLO_NODE_LEN], node[PAL_LINK_NODE_ID_LEN];
    const char *name = tok[1];
    long n = hex_field(tok, ntok, "payload", payload, sizeof payload);

    if (strcmp(tok[0], "hello") == 0) {
        pal_link_hello_t want, got;
        memset(&want, 0, sizeof want);
        memset(&got, 0, sizeof got);
        want.version = (uint8_t)num_field(tok, ntok, "version");
        want.mtu = (uint16_t)num_field(tok, ntok, "mtu");
        want.boot_counter = (uint32_t)num_field(tok, ntok, "boot");
        check(n >= (long)PAL_LINK_HELLO_LEN
                  && pal_link_hello_build(out, &want) == PAL_LINK_HELLO_LEN
                  && memcmp(out, payload, PAL_LINK_HELLO_LEN) == 0,
              "hello encodes to the first 8 payload bytes", name);
        check(n >= 0 && pal_link_hello_parse(payload, (size_t)n, &got) == 0
                  && got.version == want.version && got.mtu == want.mtu
                  && got.boot_counter == want.boot_counter,
              "hello parses", name);
        check(pal_link_ctl_type(payload, (size_t)n) == (int)PAL_LINK_CTL_HELLO, "hello type", name);
        if (field(tok, ntok, "node") != NULL) {
            long k = hex_field(tok, ntok, "node", node, sizeof node);
            check(k == (long)PAL_LINK_NODE_ID_LEN && n >= (long)PAL_LINK_HELLO_NODE_LEN
                      && pal_link_hello_build_node(out, &want, node) == PAL_LINK_HELLO_NODE_LEN
                      && memcmp(out, payload, PAL_LINK_HELLO_NODE_LEN) == 0,
                  "hello with a node id encodes to the first 16 payload bytes", name);
            check(got.has_node_id == 1 && memcmp(got.node_id, node, sizeof node) == 0,
                  "hello node id parses", name);
        } else {
            check(got.has_node_id == 0, "hello without a node id parses as such", name);
        }
    } else if (strcmp(tok[0], "ping") == 0 || strcmp(tok[0], "pong") == 0) {
        int ping = tok[0][1] == 'i';
        uint32_t token = (uint32_t)num_field(tok, ntok, "token"), got = 0;
        size_t len = ping ? pal_link_ping_build(out, token) : pal_link_pong_build(out, token);
        check(n == (long)len && memcmp(out, payload, len) == 0, "ping/pong encodes", name);
        check(pal_link_token_parse(payload, (size_t)n, &got) == 0 && got == token,
              "ping/pong token parses", name);
        check(pal_link_ctl_type(payload, (size_t)n)
                  == (int)(ping ? PAL_LINK_CTL_PING : PAL_LINK_CTL_PONG),
              "ping/pong type", name);
    } else { /* badctl */
        const char *err = field(tok, ntok, "error");
        int want = -999, got;
        pal_link_hello_t h;
        uint32_t token;
        if (err != NULL && strcmp(err, "version") == 0) want = PAL_LINK_ERR_VERSION;
        if (err != NULL && strcmp(err, "mtu") == 0) want = PAL_LINK_ERR_MTU;
        if (err != NULL && strcmp(err, "malformed") == 0) want = PAL_LINK_ERR_MALFORMED;
        got = payload[0] == PAL_LINK_CTL_HELLO ? pal_link_hello_parse(payload, (size_t)n, &h)
                                               : pal_link_token_parse(payload, (size_t)n, &token);
        check(n > 0 && got == want, "bad control payload is refused with its error", name);
    }
}

static void test_decode_vector(char **tok, int ntok)
{
    static uint8_t input[MAX_BYTES];
    const char *name = tok[1];
    size_t max_payload = (size_t)num_field(tok, ntok, "max_payload");
    long n = hex_field(tok, ntok, "input", input, sizeof input);
    const char *want_frames = field(tok, ntok, "frames");
    frames_t *fr = malloc(sizeof *fr);
    size_t step;

    if (n < 0 || want_frames == NULL || fr == NULL || max_payload > MAX_BYTES) {
        check(0, "decode vector parses", name);
        free(fr);
        return;
    }
    /* Every way of cutting the input must give the same result. */
    for (step = 0; step <= 8; step++) {
        pal_link_stats_t s = decode(input, (size_t)n, max_payload, step == 8 ? (size_t)n : step,
                                    fr);
        const char *p = want_frames;
        int i = 0, ok = 1;
        while (*p != '\0' && ok) {
            uint8_t want[MAX_BYTES];
            char hex[2 * MAX_BYTES + 1];
            char *colon;
            size_t hl = strcspn(p, ",");
            long wl;
            unsigned long ch = strtoul(p, &colon, 10);
            if (*colon != ':' || hl >= sizeof hex) {
                ok = 0;
                break;
            }
            memcpy(hex, colon + 1, hl - (size_t)(colon + 1 - p));
            hex[hl - (size_t)(colon + 1 - p)] = '\0';
            wl = unhex(hex, want, sizeof want);
            ok = i < fr->count && wl >= 0 && fr->channel[i] == ch && fr->len[i] == (size_t)wl
                 && memcmp(fr->payload[i], want, (size_t)wl) == 0;
            i++;
            p += hl;
            if (*p == ',') p++;
        }
        ok = ok && i == fr->count && s.frames == (uint32_t)i
             && s.crc_errors == num_field(tok, ntok, "crc_errors")
             && s.oversize == num_field(tok, ntok, "oversize")
             && s.cobs_errors == num_field(tok, ntok, "cobs_errors")
             && s.short_frames == num_field(tok, ntok, "short_frames");
        check(ok, step == 0 ? "decode vector, byte by byte" : "decode vector, in pieces", name);
    }
    free(fr);
}

static int run_vectors(const char *path)
{
    static char line[3 * MAX_BYTES];
    FILE *f = fopen(path, "r");
    int in_block = 0, count = 0;

    if (f == NULL) {
        printf("cannot open %s\n", path);
        return -1;
    }
    while (fgets(line, sizeof line, f) != NULL) {
        char *tok[16];
        int ntok = 0;
        char *t;
        if (strncmp(line, "```", 3) == 0) {
            in_block = strncmp(line, "```link-vectors", 15) == 0;
            continue;
        }
        if (!in_block || line[0] == '#') {
            continue;
        }
        for (t = strtok(line, " \t\r\n"); t != NULL && ntok < 16; t = strtok(NULL, " \t\r\n")) {
            tok[ntok++] = t;
        }
        if (ntok < 2) {
            continue;
        }
        count++;
        if (strcmp(tok[0], "frame") == 0) {
            test_frame_vector(tok, ntok);
        } else if (strcmp(tok[0], "crc") == 0) {
            test_crc_vector(tok, ntok);
        } else if (strcmp(tok[0], "decode") == 0) {
            test_decode_vector(tok, ntok);
        } else if (strcmp(tok[0], "hello") == 0 || strcmp(tok[0], "ping") == 0
                   || strcmp(tok[0], "pong") == 0 || strcmp(tok[0], "badctl") == 0) {
            test_control_vector(tok, ntok);
        } else {
            check(0, "known vector kind", tok[0]);
        }
    }
    fclose(f);
    return count;
}

/* ---- properties -------------------------------------------------------------------------- */

static void test_crc_against_reference(void)
{
    static uint8_t data[600];
    size_t len, off, i;
    int ok = 1;

    for (i = 0; i < sizeof data; i++) {
        data[i] = (uint8_t)rng();
    }
    for (off = 0; off < 8; off++) {
        for (len = 0; len + off <= 300; len++) {
            ok = ok && pal_link_crc32(0, data + off, len) == crc_reference(data + off, len);
        }
    }
    /* incremental use, split anywhere, equals one pass */
    for (len = 0; len <= 64; len++) {
        uint32_t c = pal_link_crc32(0, data, len);
        ok = ok && pal_link_crc32(c, data + len, 64 - len) == crc_reference(data, 64);
    }
    check(ok, "crc equals the bitwise reference at every length, offset and split", "crc");
}

static void test_random_round_trips(void)
{
    static uint8_t payload[1100], stream[8 * 1200], out[1200];
    frames_t *fr = malloc(sizeof *fr);
    int round, ok_bound = 1, ok_trip = 1, ok_max = 1;

    for (round = 0; round < 300 && fr != NULL; round++) {
        size_t plen = rng() % sizeof payload, i, slen = 0;
        /* a payload byte is zero one time in this many (0: never) */
        static const uint32_t zero_one_in[4] = {0, 16, 4, 1};
        uint32_t one_in = zero_one_in[rng() % 4];
        int zero_free = 1;
        uint32_t crc;
        uint8_t ch = (uint8_t)rng();
        int32_t n;
        for (i = 0; i < plen; i++) {
            uint8_t b = (one_in != 0 && rng() % one_in == 0) ? 0 : (uint8_t)(rng() | 1u);
            payload[i] = b;
            zero_free = zero_free && b != 0;
        }
        n = pal_link_encode(ch, payload, plen, out, sizeof out);
        ok_bound = ok_bound && n > 0 && (size_t)n <= PAL_LINK_ENCODED_MAX(plen);
        crc = pal_link_crc32(pal_link_crc32(0, &ch, 1), payload, plen);
        if (zero_free && ch != 0 && (crc & 0xFFu) && (crc & 0xFF00u) && (crc & 0xFF0000u)
            && (crc & 0xFF000000u)) {
            ok_max = ok_max && n > 0 && (size_t)n == PAL_LINK_ENCODED_MAX(plen);
        }
        /* junk (zero-free, ends in a delimiter), frame, frame again */
        for (i = rng() % 40; i > 0; i--) {
            stream[slen++] = (uint8_t)(rng() | 1u);
        }
        stream[slen++] = 0;
        memcpy(stream + slen, out, (size_t)n);
        slen += (size_t)n;
        memcpy(stream + slen, out, (size_t)n);
        slen += (size_t)n;
        decode(stream, slen, plen, (size_t)(rng() % 64), fr);
        ok_trip = ok_trip && fr->count == 2 && fr->channel[1] == ch && fr->len[1] == plen
                  && memcmp(fr->payload[1], payload, plen) == 0;
    }
    check(fr != NULL && ok_bound, "random frames stay within PAL_LINK_ENCODED_MAX", "random");
    check(fr != NULL && ok_max, "PAL_LINK_ENCODED_MAX is tight for zero-free input", "random");
    check(fr != NULL && ok_trip, "random frames survive junk and decode back", "random");
    free(fr);
}

static void test_limits(void)
{
    static uint8_t big[PAL_LINK_MAX_PAYLOAD + 1];
    static uint8_t out[PAL_LINK_ENCODED_MAX(PAL_LINK_MAX_PAYLOAD) + 1];
    pal_link_enc_t e;
    int32_t n;

    memset(big, 0x55, sizeof big);
    n = pal_link_encode(1, big, sizeof big, out, sizeof out);
    check(n == PAL_LINK_ERR_TOO_LONG, "payload over 65535 bytes is refused", "limits");
    n = pal_link_encode(1, big, PAL_LINK_MAX_PAYLOAD, out, sizeof out);
    check(n > 0 && (size_t)n <= PAL_LINK_ENCODED_MAX(PAL_LINK_MAX_PAYLOAD),
          "65535-byte payload encodes within the worst case", "limits");
    pal_link_enc_begin(&e, out, sizeof out, 0);
    pal_link_enc_write(&e, big, 40000);
    pal_link_enc_write(&e, big, 40000);
    check(pal_link_enc_end(&e) == PAL_LINK_ERR_TOO_LONG, "streamed payload over 65535 is refused",
          "limits");
    check(pal_link_encoded_max(512) == PAL_LINK_ENCODED_MAX(512), "encoded_max matches the macro",
          "limits");
    check(pal_link_negotiate_mtu(512, 128) == 128 && pal_link_negotiate_mtu(96, 512) == 96,
          "mtu negotiation takes the smaller", "limits");
    check(pal_link_ctl_type(big, 0) == PAL_LINK_ERR_MALFORMED, "empty control payload", "limits");
}

static void test_unbounded_junk(void)
{
    /* A long run without delimiters: counted once as oversize, then a frame right after the
     * next delimiter decodes, and the decoder never wrote past its buffer (decode() checks). */
    static uint8_t stream[5000];
    uint8_t payload[3] = {1, 2, 3};
    frames_t *fr = malloc(sizeof *fr);
    size_t i, step;
    int32_t n;

    for (i = 0; i < 4000; i++) {
        stream[i] = (uint8_t)(rng() | 0x80u);
    }
    stream[4000] = 0;
    n = pal_link_encode(PAL_LINK_CH_LOG, payload, sizeof payload, stream + 4001, 900);
    for (step = 0; step < 3 && fr != NULL && n > 0; step++) {
        pal_link_stats_t s = decode(stream, 4001 + (size_t)n, 16, step * 1000, fr);
        check(fr->count == 1 && fr->len[0] == 3 && s.oversize == 1 && s.cobs_errors == 0,
              "long junk is one oversize drop, then resync", "junk");
    }
    free(fr);
}

int main(int argc, char **argv)
{
    int vectors;

    if (argc != 2) {
        printf("usage: %s path/to/LINK.md\n", argv[0]);
        return 2;
    }
    vectors = run_vectors(argv[1]);
    check(vectors >= 20, "LINK.md holds the test vectors", argv[1]);
    test_crc_against_reference();
    test_random_round_trips();
    test_limits();
    test_unbounded_junk();
    printf("%d vectors read\n", vectors < 0 ? 0 : vectors);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
