/*
 * pal_link.c - PALISADE serial link codec. See pal_link.h for the API and
 * firmware_bridge/LINK.md for the wire format.
 *
 * Portable C99 for hosts and bare-metal MCUs alike: no malloc, no libc beyond <string.h>,
 * no global mutable state, no floating point, no division on the per-byte paths.
 */
#include "pal_link.h"

#include <string.h>

/* ---- CRC-32 -------------------------------------------------------------------------------
 *
 * The CRC runs on a "register" (the zlib value without its final inversion) so that the
 * encoder and the decoder can carry it across calls without inverting twice per piece.
 *
 * Three interchangeable implementations; define one of these to choose, or leave it to the
 * default below. All give identical results, and the test harness is built with each.
 *
 *   PAL_LINK_CRC_TABLE_FREE  eight shift/xor steps per byte, no table. Smallest: the whole
 *       codec is about 1.2 KiB of Cortex-M0 code (-Os). About 90 cycles per byte on a
 *       Cortex-M0, which a UART still cannot outrun: a full-duplex 115200-baud link moves
 *       23 kB/s in both directions together, some 4% of a 48 MHz core.
 *   PAL_LINK_CRC_BYTE_TABLE  one 256-entry const table, one lookup per byte: about 16 cycles
 *       per byte on a Cortex-M0 (under 1% of that core at 115200 baud) for 1 KiB more flash
 *       (2.2 KiB in all). The default on microcontrollers.
 *   PAL_LINK_CRC_SLICE8      slicing-by-8: seven more tables (8 KiB in all, from
 *       pal_link_crc_tables.h), eight bytes per step. About 5x faster than the byte table on a
 *       desktop core, where each byte-table step waits on the previous lookup. The default on
 *       64-bit hosts: the Python extension relies on it to beat zlib.crc32 + the `cobs`
 *       package at 512-byte frames, and 8 KiB is nothing there.
 * (Cycle counts are from the instruction sequences gcc -Os emits for Cortex-M0, not measured
 * on hardware.)
 */

#define CRC_POLY 0xEDB88320u
#define CRC_INIT 0xFFFFFFFFu
/* CRC register after running over a message followed by its own CRC (little-endian): checking
 * a frame is then one comparison, whatever its length (see the decoder). */
#define CRC_RESIDUE 0xDEBB20E3u

#if defined(PAL_LINK_CRC_TABLE_FREE) + defined(PAL_LINK_CRC_BYTE_TABLE) \
    + defined(PAL_LINK_CRC_SLICE8) > 1
#error "define at most one of PAL_LINK_CRC_TABLE_FREE, _BYTE_TABLE, _SLICE8"
#elif !defined(PAL_LINK_CRC_TABLE_FREE) && !defined(PAL_LINK_CRC_BYTE_TABLE) \
    && !defined(PAL_LINK_CRC_SLICE8)
#if defined(__x86_64__) || defined(_M_X64) || defined(__aarch64__) || defined(_M_ARM64)
#define PAL_LINK_CRC_SLICE8
#else
#define PAL_LINK_CRC_BYTE_TABLE
#endif
#endif

#ifdef PAL_LINK_CRC_TABLE_FREE
static uint32_t crc_step(uint32_t reg, uint8_t b)
{
    int k;

    reg ^= b;
    for (k = 0; k < 8; k++) {
        /* 0u - (reg & 1) is all ones when the low bit is set: a branch-free conditional xor */
        reg = (reg >> 1) ^ (CRC_POLY & (0u - (reg & 1u)));
    }
    return reg;
}
#else
static const uint32_t crc_table[256] = {
    0x00000000u, 0x77073096u, 0xEE0E612Cu, 0x990951BAu, 0x076DC419u, 0x706AF48Fu,
    0xE963A535u, 0x9E6495A3u, 0x0EDB8832u, 0x79DCB8A4u, 0xE0D5E91Eu, 0x97D2D988u,
    0x09B64C2Bu, 0x7EB17CBDu, 0xE7B82D07u, 0x90BF1D91u, 0x1DB71064u, 0x6AB020F2u,
    0xF3B97148u, 0x84BE41DEu, 0x1ADAD47Du, 0x6DDDE4EBu, 0xF4D4B551u, 0x83D385C7u,
    0x136C9856u, 0x646BA8C0u, 0xFD62F97Au, 0x8A65C9ECu, 0x14015C4Fu, 0x63066CD9u,
    0xFA0F3D63u, 0x8D080DF5u, 0x3B6E20C8u, 0x4C69105Eu, 0xD56041E4u, 0xA2677172u,
    0x3C03E4D1u, 0x4B04D447u, 0xD20D85FDu, 0xA50AB56Bu, 0x35B5A8FAu, 0x42B2986Cu,
    0xDBBBC9D6u, 0xACBCF940u, 0x32D86CE3u, 0x45DF5C75u, 0xDCD60DCFu, 0xABD13D59u,
    0x26D930ACu, 0x51DE003Au, 0xC8D75180u, 0xBFD06116u, 0x21B4F4B5u, 0x56B3C423u,
    0xCFBA9599u, 0xB8BDA50Fu, 0x2802B89Eu, 0x5F058808u, 0xC60CD9B2u, 0xB10BE924u,
    0x2F6F7C87u, 0x58684C11u, 0xC1611DABu, 0xB6662D3Du, 0x76DC4190u, 0x01DB7106u,
    0x98D220BCu, 0xEFD5102Au, 0x71B18589u, 0x06B6B51Fu, 0x9FBFE4A5u, 0xE8B8D433u,
    0x7807C9A2u, 0x0F00F934u, 0x9609A88Eu, 0xE10E9818u, 0x7F6A0DBBu, 0x086D3D2Du,
    0x91646C97u, 0xE6635C01u, 0x6B6B51F4u, 0x1C6C6162u, 0x856530D8u, 0xF262004Eu,
    0x6C0695EDu, 0x1B01A57Bu, 0x8208F4C1u, 0xF50FC457u, 0x65B0D9C6u, 0x12B7E950u,
    0x8BBEB8EAu, 0xFCB9887Cu, 0x62DD1DDFu, 0x15DA2D49u, 0x8CD37CF3u, 0xFBD44C65u,
    0x4DB26158u, 0x3AB551CEu, 0xA3BC0074u, 0xD4BB30E2u, 0x4ADFA541u, 0x3DD895D7u,
    0xA4D1C46Du, 0xD3D6F4FBu, 0x4369E96Au, 0x346ED9FCu, 0xAD678846u, 0xDA60B8D0u,
    0x44042D73u, 0x33031DE5u, 0xAA0A4C5Fu, 0xDD0D7CC9u, 0x5005713Cu, 0x270241AAu,
    0xBE0B1010u, 0xC90C2086u, 0x5768B525u, 0x206F85B3u, 0xB966D409u, 0xCE61E49Fu,
    0x5EDEF90Eu, 0x29D9C998u, 0xB0D09822u, 0xC7D7A8B4u, 0x59B33D17u, 0x2EB40D81u,
    0xB7BD5C3Bu, 0xC0BA6CADu, 0xEDB88320u, 0x9ABFB3B6u, 0x03B6E20Cu, 0x74B1D29Au,
    0xEAD54739u, 0x9DD277AFu, 0x04DB2615u, 0x73DC1683u, 0xE3630B12u, 0x94643B84u,
    0x0D6D6A3Eu, 0x7A6A5AA8u, 0xE40ECF0Bu, 0x9309FF9Du, 0x0A00AE27u, 0x7D079EB1u,
    0xF00F9344u, 0x8708A3D2u, 0x1E01F268u, 0x6906C2FEu, 0xF762575Du, 0x806567CBu,
    0x196C3671u, 0x6E6B06E7u, 0xFED41B76u, 0x89D32BE0u, 0x10DA7A5Au, 0x67DD4ACCu,
    0xF9B9DF6Fu, 0x8EBEEFF9u, 0x17B7BE43u, 0x60B08ED5u, 0xD6D6A3E8u, 0xA1D1937Eu,
    0x38D8C2C4u, 0x4FDFF252u, 0xD1BB67F1u, 0xA6BC5767u, 0x3FB506DDu, 0x48B2364Bu,
    0xD80D2BDAu, 0xAF0A1B4Cu, 0x36034AF6u, 0x41047A60u, 0xDF60EFC3u, 0xA867DF55u,
    0x316E8EEFu, 0x4669BE79u, 0xCB61B38Cu, 0xBC66831Au, 0x256FD2A0u, 0x5268E236u,
    0xCC0C7795u, 0xBB0B4703u, 0x220216B9u, 0x5505262Fu, 0xC5BA3BBEu, 0xB2BD0B28u,
    0x2BB45A92u, 0x5CB36A04u, 0xC2D7FFA7u, 0xB5D0CF31u, 0x2CD99E8Bu, 0x5BDEAE1Du,
    0x9B64C2B0u, 0xEC63F226u, 0x756AA39Cu, 0x026D930Au, 0x9C0906A9u, 0xEB0E363Fu,
    0x72076785u, 0x05005713u, 0x95BF4A82u, 0xE2B87A14u, 0x7BB12BAEu, 0x0CB61B38u,
    0x92D28E9Bu, 0xE5D5BE0Du, 0x7CDCEFB7u, 0x0BDBDF21u, 0x86D3D2D4u, 0xF1D4E242u,
    0x68DDB3F8u, 0x1FDA836Eu, 0x81BE16CDu, 0xF6B9265Bu, 0x6FB077E1u, 0x18B74777u,
    0x88085AE6u, 0xFF0F6A70u, 0x66063BCAu, 0x11010B5Cu, 0x8F659EFFu, 0xF862AE69u,
    0x616BFFD3u, 0x166CCF45u, 0xA00AE278u, 0xD70DD2EEu, 0x4E048354u, 0x3903B3C2u,
    0xA7672661u, 0xD06016F7u, 0x4969474Du, 0x3E6E77DBu, 0xAED16A4Au, 0xD9D65ADCu,
    0x40DF0B66u, 0x37D83BF0u, 0xA9BCAE53u, 0xDEBB9EC5u, 0x47B2CF7Fu, 0x30B5FFE9u,
    0xBDBDF21Cu, 0xCABAC28Au, 0x53B39330u, 0x24B4A3A6u, 0xBAD03605u, 0xCDD70693u,
    0x54DE5729u, 0x23D967BFu, 0xB3667A2Eu, 0xC4614AB8u, 0x5D681B02u, 0x2A6F2B94u,
    0xB40BBE37u, 0xC30C8EA1u, 0x5A05DF1Bu, 0x2D02EF8Du,
};

static uint32_t crc_step(uint32_t reg, uint8_t b)
{
    return crc_table[(reg ^ b) & 0xFFu] ^ (reg >> 8);
}
#endif

#ifdef PAL_LINK_CRC_SLICE8
#include "pal_link_crc_tables.h"

static uint32_t crc_update(uint32_t reg, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        /* Assembled byte by byte: endian-neutral and alignment-safe, and compilers still turn
         * it into a single load where the target allows. */
        uint32_t a = reg ^ ((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
                            | ((uint32_t)p[3] << 24));
        reg = crc_table_hi[6][a & 0xFFu] ^ crc_table_hi[5][(a >> 8) & 0xFFu]
              ^ crc_table_hi[4][(a >> 16) & 0xFFu] ^ crc_table_hi[3][a >> 24]
              ^ crc_table_hi[2][p[4]] ^ crc_table_hi[1][p[5]] ^ crc_table_hi[0][p[6]]
              ^ crc_table[p[7]];
        p += 8;
        n -= 8;
    }
    while (n--) {
        reg = crc_step(reg, *p++);
    }
    return reg;
}
#else
static uint32_t crc_update(uint32_t reg, const uint8_t *p, size_t n)
{
    while (n--) {
        reg = crc_step(reg, *p++);
    }
    return reg;
}
#endif

uint32_t pal_link_crc32(uint32_t crc, const uint8_t *data, size_t len)
{
    return ~crc_update(~crc, data, len);
}

/* ---- encoder ------------------------------------------------------------------------------
 *
 * COBS cuts its input at every zero byte into blocks of at most 254 non-zero bytes; each block
 * is sent as a code byte (1 + its length) followed by its bytes, and a code below 0xFF means
 * "a zero followed this block". A full block (code 0xFF) implies no zero, which is why a block
 * is opened lazily after one: an input ending in exactly 254 non-zero bytes must not grow an
 * extra empty block (this is the canonical form, the one the reference `cobs` package emits).
 * After a zero, on the other hand, the next block is opened at once, since it has to exist even
 * if it stays empty.
 *
 * The code byte of the open block is only known when the block closes, so its slot is reserved
 * in the output and written on closing; nothing needs to be buffered beyond the output itself.
 */

static void enc_fail(pal_link_enc_t *e, int8_t err)
{
    if (e->err == 0) {
        e->err = err;
    }
}

static void enc_open_block(pal_link_enc_t *e)
{
    if (e->pos >= e->cap) {
        enc_fail(e, PAL_LINK_ERR_SPACE);
        return;
    }
    e->code_pos = e->pos++;
    e->code = 1;
}

/* COBS-encode n bytes. Runs between zeros are copied with memcpy, not byte by byte. */
static void enc_cobs(pal_link_enc_t *e, const uint8_t *p, size_t n)
{
    while (n > 0 && e->err == 0) {
        const uint8_t *zero;
        size_t run, room;

        if (e->code == 0) {
            enc_open_block(e);
            if (e->err != 0) {
                return;
            }
        }
        room = (size_t)(0xFFu - e->code);
        run = n < room ? n : room;
        zero = (const uint8_t *)memchr(p, 0, run);
        if (zero != NULL) {
            run = (size_t)(zero - p);
        }
        if (run > e->cap - e->pos) {
            enc_fail(e, PAL_LINK_ERR_SPACE);
            return;
        }
        memcpy(e->out + e->pos, p, run);
        e->pos += run;
        e->code = (uint8_t)(e->code + run);
        p += run;
        n -= run;
        if (zero != NULL) {
            /* The zero closes the block (its code says so) and the next one opens at once. */
            e->out[e->code_pos] = e->code;
            enc_open_block(e);
            p++;
            n--;
        } else if (e->code == 0xFFu) {
            e->out[e->code_pos] = 0xFFu;
            e->code = 0;
        }
    }
}

void pal_link_enc_begin(pal_link_enc_t *e, uint8_t *out, size_t cap, uint8_t channel)
{
    e->out = out;
    e->cap = cap;
    e->pos = 0;
    e->code_pos = 0;
    e->code = 0;
    e->err = 0;
    e->payload_len = 0;
    e->crc = crc_update(CRC_INIT, &channel, 1);
    enc_cobs(e, &channel, 1);
}

void pal_link_enc_write(pal_link_enc_t *e, const uint8_t *data, size_t len)
{
    if (e->err != 0) {
        return;
    }
    if (len > PAL_LINK_MAX_PAYLOAD - e->payload_len) {
        enc_fail(e, PAL_LINK_ERR_TOO_LONG);
        return;
    }
    e->payload_len += len;
    e->crc = crc_update(e->crc, data, len);
    enc_cobs(e, data, len);
}

int32_t pal_link_enc_end(pal_link_enc_t *e)
{
    uint32_t crc = ~e->crc;
    uint8_t trailer[4];

    trailer[0] = (uint8_t)crc;
    trailer[1] = (uint8_t)(crc >> 8);
    trailer[2] = (uint8_t)(crc >> 16);
    trailer[3] = (uint8_t)(crc >> 24);
    enc_cobs(e, trailer, sizeof trailer);
    if (e->err == 0 && e->code != 0) {
        e->out[e->code_pos] = e->code; /* the final block's implied zero is the delimiter */
        e->code = 0;
    }
    if (e->err == 0 && e->pos >= e->cap) {
        enc_fail(e, PAL_LINK_ERR_SPACE);
    }
    if (e->err != 0) {
        return e->err;
    }
    e->out[e->pos++] = 0x00u;
    return (int32_t)e->pos;
}

int32_t pal_link_encode(uint8_t channel, const uint8_t *payload, size_t len, uint8_t *out,
                        size_t cap)
{
    pal_link_enc_t e;

    pal_link_enc_begin(&e, out, cap, channel);
    pal_link_enc_write(&e, payload, len);
    return pal_link_enc_end(&e);
}

size_t pal_link_encoded_max(size_t payload_len)
{
    return PAL_LINK_ENCODED_MAX(payload_len);
}

/* ---- decoder ------------------------------------------------------------------------------
 *
 * Theory of operation. The decoder is a four-state machine driven one byte at a time:
 *
 *   IDLE  between frames. 0x00 here is idle fill (senders may flush the line with extra
 *         delimiters) and is ignored; any other byte is the first COBS code of a new frame.
 *   DATA  inside a COBS block: `left` literal bytes are still due. A literal is appended to
 *         the buffer. A 0x00 here means bytes were lost (the block was cut short): the frame
 *         is dropped as a COBS error, and since that 0x00 is a delimiter the decoder is
 *         already back in sync, in IDLE.
 *   CODE  at a block boundary. 0x00 ends the frame, which is then checked. Any other byte is
 *         the next block's code; the zero implied by the previous block (code < 0xFF) is
 *         appended first. Appending it only now, not when the previous block ended, is what
 *         drops the implied zero of the final block, and it means the buffer never holds a
 *         byte that is not part of the frame.
 *   HUNT  after an oversize frame: every byte up to the next 0x00 is dropped, then IDLE.
 *
 * A 0x00 is always a delimiter, in every state, so whatever arrives (line noise, a dropped
 * or inserted byte, unframed text from a bootloader) costs at most the frame it lands in and
 * the decoder resynchronises at the next delimiter. Memory is the caller's buffer and nothing
 * else: a frame that would not fit is dropped (HUNT) instead of being kept in part.
 *
 * The CRC is run over every decoded byte as it arrives, trailer included, and a good frame
 * leaves the fixed residue CRC_RESIDUE. Work per byte is constant and a frame is checked in
 * O(1) at its delimiter, so pushing from a UART interrupt never causes a long stall there.
 *
 * pal_link_dec_feed() runs the same machine but handles the two common long runs in bulk:
 * literal bytes in DATA (memchr for a zero, memcpy, one CRC loop) and skipping in HUNT (one
 * memchr). Every other byte goes through dec_step(), the same code pal_link_dec_push() uses.
 */

enum { ST_IDLE = 0, ST_DATA, ST_CODE, ST_HUNT };

void pal_link_dec_init(pal_link_dec_t *d, uint8_t *buf, size_t cap)
{
    d->buf = buf;
    d->cap = cap;
    memset(&d->stats, 0, sizeof d->stats);
    pal_link_dec_reset(d);
}

void pal_link_dec_reset(pal_link_dec_t *d)
{
    d->len = 0;
    d->crc = CRC_INIT;
    d->state = ST_IDLE;
    d->code = 0;
    d->left = 0;
}

static void dec_start_block(pal_link_dec_t *d, uint8_t code)
{
    d->code = code;
    d->left = (uint8_t)(code - 1u);
    d->state = d->left != 0 ? ST_DATA : ST_CODE;
}

/* Returns 0 when the buffer is full: the frame is then dropped as oversize. */
static int dec_append(pal_link_dec_t *d, uint8_t b)
{
    if (d->len == d->cap) {
        d->stats.oversize++;
        d->state = ST_HUNT;
        return 0;
    }
    d->buf[d->len++] = b;
    d->crc = crc_step(d->crc, b);
    return 1;
}

/* The delimiter at a block boundary: the frame is complete; deliver it if it checks out. */
static int dec_finish(pal_link_dec_t *d, pal_link_frame_t *frame)
{
    size_t len = d->len;
    uint32_t crc = d->crc;

    d->state = ST_IDLE;
    d->len = 0;
    d->crc = CRC_INIT;
    if (len < PAL_LINK_FRAME_OVERHEAD) {
        d->stats.short_frames++;
        return 0;
    }
    if (crc != CRC_RESIDUE) {
        d->stats.crc_errors++;
        return 0;
    }
    d->stats.frames++;
    frame->channel = d->buf[0];
    frame->payload = d->buf + 1;
    frame->len = len - PAL_LINK_FRAME_OVERHEAD;
    return 1;
}

static int dec_step(pal_link_dec_t *d, uint8_t b, pal_link_frame_t *frame)
{
    switch (d->state) {
    case ST_IDLE:
        if (b != 0) {
            dec_start_block(d, b);
        }
        return 0;
    case ST_DATA:
        if (b == 0) {
            d->stats.cobs_errors++;
            pal_link_dec_reset(d);
            return 0;
        }
        if (dec_append(d, b) && --d->left == 0) {
            d->state = ST_CODE;
        }
        return 0;
    case ST_CODE:
        if (b == 0) {
            return dec_finish(d, frame);
        }
        if (d->code != 0xFFu && !dec_append(d, 0)) {
            return 0;
        }
        dec_start_block(d, b);
        return 0;
    default: /* ST_HUNT */
        if (b == 0) {
            pal_link_dec_reset(d);
        }
        return 0;
    }
}

int pal_link_dec_push(pal_link_dec_t *d, uint8_t byte, pal_link_frame_t *frame)
{
    return dec_step(d, byte, frame);
}

int pal_link_dec_feed(pal_link_dec_t *d, const uint8_t *data, size_t len, size_t *consumed,
                      pal_link_frame_t *frame)
{
    size_t i = 0;

    while (i < len) {
        if (d->state == ST_DATA) {
            /* Literal run: up to the end of the block, the input, or the first zero. */
            size_t want = len - i < d->left ? len - i : d->left;
            const uint8_t *zero = (const uint8_t *)memchr(data + i, 0, want);
            size_t run = zero != NULL ? (size_t)(zero - (data + i)) : want;

            if (run > 0) {
                if (run > d->cap - d->len) {
                    /* Byte by byte this would fill the buffer and then overflow it. */
                    d->stats.oversize++;
                    d->state = ST_HUNT;
                } else {
                    memcpy(d->buf + d->len, data + i, run);
                    d->crc = crc_update(d->crc, data + i, run);
                    d->len += run;
                    d->left = (uint8_t)(d->left - run);
                    if (d->left == 0) {
                        d->state = ST_CODE;
                    }
                }
                i += run;
                continue;
            }
        } else if (d->state == ST_HUNT) {
            const uint8_t *zero = (const uint8_t *)memchr(data + i, 0, len - i);
            if (zero == NULL) {
                i = len;
                break;
            }
            i = (size_t)(zero - data); /* dec_step() takes the delimiter */
        }
        if (dec_step(d, data[i++], frame)) {
            *consumed = i;
            return 1;
        }
    }
    *consumed = i;
    return 0;
}

/* ---- link control -------------------------------------------------------------------------
 *
 * Multi-byte fields on the link are little-endian, like the CRC trailer: it is the native
 * order of nearly every MCU these links serve. (PALISADE packets inside channel 0 keep their
 * own big-endian encoding; the link never looks inside them.)
 */

static void put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint16_t get_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
           | ((uint32_t)p[3] << 24);
}

size_t pal_link_hello_build(uint8_t out[PAL_LINK_HELLO_LEN], const pal_link_hello_t *hello)
{
    out[0] = PAL_LINK_CTL_HELLO;
    out[1] = hello->version;
    put_le16(out + 2, hello->mtu);
    put_le32(out + 4, hello->boot_counter);
    return PAL_LINK_HELLO_LEN;
}

size_t pal_link_hello_build_node(uint8_t out[PAL_LINK_HELLO_NODE_LEN],
                                 const pal_link_hello_t *hello,
                                 const uint8_t node_id[PAL_LINK_NODE_ID_LEN])
{
    pal_link_hello_build(out, hello);
    if (out[1] < 2u) {
        out[1] = 2u; /* the node id field exists from version 2 on */
    }
    memcpy(out + PAL_LINK_HELLO_LEN, node_id, PAL_LINK_NODE_ID_LEN);
    return PAL_LINK_HELLO_NODE_LEN;
}

static size_t token_build(uint8_t *out, uint8_t type, uint32_t token)
{
    out[0] = type;
    put_le32(out + 1, token);
    return PAL_LINK_PING_LEN;
}

size_t pal_link_ping_build(uint8_t out[PAL_LINK_PING_LEN], uint32_t token)
{
    return token_build(out, PAL_LINK_CTL_PING, token);
}

size_t pal_link_pong_build(uint8_t out[PAL_LINK_PING_LEN], uint32_t token)
{
    return token_build(out, PAL_LINK_CTL_PONG, token);
}

int pal_link_ctl_type(const uint8_t *payload, size_t len)
{
    return len > 0 ? (int)payload[0] : PAL_LINK_ERR_MALFORMED;
}

int pal_link_hello_parse(const uint8_t *payload, size_t len, pal_link_hello_t *hello)
{
    pal_link_hello_t h;

    if (len < PAL_LINK_HELLO_LEN || payload[0] != PAL_LINK_CTL_HELLO) {
        return PAL_LINK_ERR_MALFORMED;
    }
    h.version = payload[1];
    h.mtu = get_le16(payload + 2);
    h.boot_counter = get_le32(payload + 4);
    /* Version 1 HELLOs never carry it; a shorter version 2 HELLO is a device without one. */
    h.has_node_id = (uint8_t)(h.version >= 2u && len >= PAL_LINK_HELLO_NODE_LEN);
    if (h.has_node_id) {
        memcpy(h.node_id, payload + PAL_LINK_HELLO_LEN, PAL_LINK_NODE_ID_LEN);
    } else {
        memset(h.node_id, 0, PAL_LINK_NODE_ID_LEN);
    }
    if (h.version == 0) {
        return PAL_LINK_ERR_VERSION;
    }
    if (h.mtu < PAL_LINK_MIN_MTU) {
        return PAL_LINK_ERR_MTU;
    }
    *hello = h;
    return 0;
}

int pal_link_token_parse(const uint8_t *payload, size_t len, uint32_t *token)
{
    if (len < PAL_LINK_PING_LEN
        || (payload[0] != PAL_LINK_CTL_PING && payload[0] != PAL_LINK_CTL_PONG)) {
        return PAL_LINK_ERR_MALFORMED;
    }
    *token = get_le32(payload + 1);
    return 0;
}

uint16_t pal_link_negotiate_mtu(uint16_t ours, uint16_t theirs)
{
    return ours < theirs ? ours : theirs;
}
